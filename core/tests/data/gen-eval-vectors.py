#!/usr/bin/env python3
"""Produces eval-vectors.json by running the official Rollgate evaluators on a set of cases.

The expected results are those of `evaluateFlagWithReason` from the Node SDK
(rollgate/sdks packages/sdk-node/src/evaluate.ts, with the reason helpers of
packages/sdk-core/src/reasons.ts), the only evaluator an official client runs. The value the
Python SDK's evaluator (PyPI rollgate==1.2.3, rollgate/evaluate.py) gives is recorded next to it
wherever it differs, to document the Python/JavaScript differences.

Where rollgate-proxy deliberately differs from Node (see core/src/eval.rs), the case carries
`divergence`, `expected` holds the proxy's result and `node` the official one.

Usage (neither evaluator is vendored in this repository):
    pip download --no-deps rollgate==1.2.3 && unzip rollgate-1.2.3-py3-none-any.whl -d py
    # evaluate.js: evaluate.ts (evaluateFlagWithReason and helpers) transpiled to CommonJS
    python3 gen-eval-vectors.py --node-evaluator evaluate.js --python-sdk py > eval-vectors.json
"""

import argparse
import json
import subprocess

NODE_BRIDGE = r"""
const e = require(process.argv[1]);
const input = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const out = input.contexts.map((ctx) => {
  const res = {};
  for (const [key, flag] of Object.entries(input.flags)) {
    res[key] = e.evaluateFlagWithReason({ ...flag, key }, ctx);
  }
  return res;
});
process.stdout.write(JSON.stringify(out));
"""

ALIASES = {"eq": "equals", "neq": "not_equals", "gt": "greater_than",
           "gte": "greater_equal", "lt": "less_than", "lte": "less_equal"}
UNSUPPORTED_REGEXES = {"^(?!bob)", "(?<=@)example", "(a)\\1"}


def rule(rule_id, conditions, rollout=100, enabled=True):
    return {"id": rule_id, "enabled": enabled, "rollout": rollout, "conditions": conditions}


def cond(attribute, operator, value):
    return {"attribute": attribute, "operator": operator, "value": value}


def groups():
    out = []

    # 1. Fallthrough rollouts (protocol doc §3.5 vectors among them).
    flags = {
        "rollout-50": {"enabled": True, "rollout": 50},
        "rollout-10": {"enabled": True, "rollout": 10},
        "my-feature": {"enabled": True, "rollout": 50},
        "rollout-1": {"enabled": True, "rollout": 1},
        "rollout-99": {"enabled": True, "rollout": 99},
        "enabled-flag": {"enabled": True, "rollout": 100},
        "no-one": {"enabled": True, "rollout": 0},
        "disabled-flag": {"enabled": False, "rollout": 100},
    }
    contexts = [("anonymous", None), ("empty id", {"id": ""}),
                ("attributes only", {"attributes": {"plan": "pro"}}),
                ("unicode id", {"id": "ユーザー-é"})]
    contexts += [(f"user {u}", {"id": u}) for u in
                 ["user-1", "consistent-user-123", "user-123", "user-2", "user-3", "user-4",
                  "user-5", "user-6", "user-7", "user-8", "user-9", "user-10", "a", "b", "c"]]
    out.append(("rollouts", {"version": "1", "flags": flags}, contexts))

    # 2. Precedence: OFF, TARGET_MATCH, first enabled matching rule, FALLTHROUGH.
    flags = {
        "off": {"enabled": False, "rollout": 100, "targetUsers": ["vip"],
                "rules": [rule("r", [cond("plan", "equals", "pro")])]},
        "ordered": {"enabled": True, "rollout": 30, "targetUsers": ["vip", "vip-2"], "rules": [
            rule("disabled", [cond("plan", "equals", "pro")], enabled=False),
            rule("empty", []),
            rule("pro-eu", [cond("plan", "equals", "pro"), cond("region", "equals", "eu")]),
            rule("pro", [cond("plan", "equals", "pro")], rollout=0),
            rule("half", [cond("plan", "is_set", "")], rollout=50),
            rule("beta", [cond("beta", "equals", "true"), cond("age", "greater_than", "17")],
                 rollout=100),
            rule("no-email", [cond("email", "is_not_set", "")], rollout=100),
        ]},
        "targets-only": {"enabled": True, "rollout": 0, "targetUsers": ["vip", "user-1"]},
        "rules-only": {"enabled": True, "rollout": 0, "rules": [
            rule("ten", [cond("id", "starts_with", "user-")], rollout=10),
            rule("ninety", [cond("id", "is_set", "")], rollout=90)]},
        "all-disabled": {"enabled": True, "rollout": 100, "rules": [
            rule("x", [cond("id", "is_set", "")], rollout=0, enabled=False)]},
    }
    contexts = [
        ("anonymous", None),
        ("target", {"id": "vip", "attributes": {"plan": "pro", "region": "us"}}),
        ("target is case-sensitive", {"id": "VIP"}),
        ("pro in eu", {"id": "u-1", "attributes": {"plan": "Pro", "region": "EU"}}),
        ("pro in us", {"id": "u-1", "attributes": {"plan": "pro", "region": "us"}}),
        ("free", {"id": "user-1", "attributes": {"plan": "free"}}),
        ("free 2", {"id": "user-2", "attributes": {"plan": "free"}}),
        ("free 3", {"id": "user-3", "attributes": {"plan": "free"}}),
        ("beta adult", {"id": "u-2", "email": "a@b.c",
                        "attributes": {"beta": True, "age": 18}}),
        ("beta minor", {"id": "u-3", "email": "a@b.c",
                        "attributes": {"beta": True, "age": "17"}}),
        ("id only", {"id": "u-4"}),
        ("email only", {"id": "u-5", "email": "x@y.z"}),
        ("empty id with plan", {"id": "", "attributes": {"plan": "free"}}),
        ("empty id", {"id": ""}),
        ("no id with plan", {"attributes": {"plan": "free"}}),
        ("no id with email", {"email": "x@y.z", "attributes": {"plan": "pro", "region": "eu"}}),
    ]
    contexts += [(f"user {i}", {"id": f"user-{i}", "email": "e@x.y"}) for i in range(10, 20)]
    out.append(("precedence", {"version": "2", "flags": flags}, contexts))

    # 3. One flag per (operator, value): a single rule on attribute `a` (rollout 100) over a
    # fallthrough of 0, so the value says whether the condition matched.
    specs = [
        ("equals", "pro"), ("equals", "PRO"), ("equals", "42"), ("equals", "true"),
        ("equals", ""), ("equals", "école"), ("equals", "1e+21"),
        ("not_equals", "pro"), ("not_equals", ""),
        ("contains", "EXAMPLE"), ("contains", ""), ("contains", "ß"), ("contains", "pro"),
        ("not_contains", "example"),
        ("starts_with", "bob"), ("starts_with", "4"), ("ends_with", ".COM"),
        ("in", "pro, team ,Enterprise"), ("in", "1,2,42"), ("in", "true,false"), ("in", ","),
        ("in", "pro,\u00a0team\ufeff"), ("not_in", "pro,team"),
        ("greater_than", "18"), ("greater_than", "18abc"), ("greater_than", "abc"),
        ("greater_than", ".5"), ("greater_than", "1e1"), ("greater_than", "Infinity"),
        ("greater_than", "0x10"), ("greater_than", " 19"), ("greater_equal", "42"),
        ("less_than", "18"), ("less_equal", "42"), ("less_equal", "-0"),
        ("regex", "^[a-z]+@example\\.com$"), ("regex", "example"), ("regex", "^\\d+$"),
        ("regex", "^\\w+$"), ("regex", "\\bpro\\b"), ("regex", "^.$"), ("regex", "a{"),
        ("regex", "[a-"), ("regex", "(?i)pro"), ("regex", "^4\\d$"), ("regex", "^true$"),
        ("regex", ""), ("regex", "PRO"), ("regex", "^\\s*$"), ("regex", "é$"),
        ("regex", "^(?!bob)"), ("regex", "(?<=@)example"), ("regex", "(a)\\1"),
        ("semver_gt", "1.2.3"), ("semver_gt", "v1.2"), ("semver_gt", "1.2.3-beta"),
        ("semver_lt", "2.0.0"), ("semver_eq", "1.2.3"), ("semver_eq", "1.2"),
        ("semver_eq", "1.5"), ("semver_eq", "x"),
        ("is_set", ""), ("is_not_set", ""),
        ("eq", "pro"), ("neq", "pro"), ("gt", "18"), ("gte", "42"), ("lt", "18"),
        ("lte", "42"),
        ("bogus", "x"), ("EQUALS", "pro"), ("semver_gte", "1.0"),
    ]
    flags = {}
    for i, (op, value) in enumerate(specs):
        flags[f"op-{i:02d}-{op}"] = {"enabled": True, "rollout": 0,
                                     "rules": [rule(f"r{i}", [cond("a", op, value)])]}
    values = [
        None, "", "pro", "PRO", "Pro ", "team", "Team", "enterprise", "free",
        "bob@Example.com", "bob@example.com", "admin@example.com", "x pro y",
        42, 42.5, 0, 1e21, 0.000001, True, False,
        "42", "19", "21years", " 19", "12abc", "abc", "-1", "Infinity",
        "1.2.3", "v1.10.0", "1.2.3-beta", "1.2.3-beta.1", "1.2", "2.x", "V1.2",
        "١٢٣", "héllo", "école", "ÉCOLE", "STRAßE", "\r", "é", "a{", " ",
    ]
    contexts = []
    for v in values:
        attrs = {} if v is None else {"a": v}
        contexts.append((f"a = {json.dumps(v, ensure_ascii=False)}",
                         {"id": "u-1", "attributes": attrs}))
    out.append(("operators", {"version": "3", "flags": flags}, contexts))

    # 4. Which context field a condition reads.
    flags = {
        "by-id": {"enabled": True, "rollout": 0,
                  "rules": [rule("r", [cond("id", "ends_with", "-1")])]},
        "by-email": {"enabled": True, "rollout": 0,
                     "rules": [rule("r", [cond("email", "ends_with", "@example.com")])]},
        "email-set": {"enabled": True, "rollout": 0,
                      "rules": [rule("r", [cond("email", "is_set", "")])]},
        "by-userId": {"enabled": True, "rollout": 0,
                      "rules": [rule("r", [cond("userId", "is_set", "")])]},
        "id-not-set": {"enabled": True, "rollout": 0,
                       "rules": [rule("r", [cond("id", "is_not_set", "")])]},
    }
    contexts = [
        ("anonymous", None),
        ("id and email", {"id": "user-1", "email": "Bob@Example.com"}),
        ("attributes id and email", {"id": "user-2", "attributes": {
            "id": "user-1", "email": "bob@example.com", "userId": "user-1"}}),
        ("empty id", {"id": "", "email": "a@example.com"}),
        ("no id", {"email": "a@example.org"}),
    ]
    out.append(("attributes", {"version": "4", "flags": flags}, contexts))
    return out


def run_node(evaluator, flags, contexts):
    proc = subprocess.run(["node", "-e", NODE_BRIDGE, evaluator], check=True,
                          input=json.dumps({"flags": flags, "contexts": contexts}),
                          capture_output=True, text=True)
    return json.loads(proc.stdout)


def load_python_evaluator(sdk_dir):
    # Load rollgate/evaluate.py alone: the package __init__ pulls in httpx, which the
    # evaluator does not need.
    import importlib.util
    import os
    path = os.path.join(sdk_dir, "rollgate", "evaluate.py")
    spec = importlib.util.spec_from_file_location("rollgate_evaluate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_python(evaluate, payload, ctx):
    LocalEvaluator, UserContext = evaluate.LocalEvaluator, evaluate.UserContext
    ev = LocalEvaluator()
    ev.set_rules_from_dict(payload)
    user = None if ctx is None else UserContext(
        id=ctx.get("id"), email=ctx.get("email"), attributes=ctx.get("attributes"))
    out = {}
    for key in payload["flags"]:
        try:
            out[key] = ev.evaluate(key, user)
        except Exception as exc:  # noqa: BLE001 - recorded, not hidden
            out[key] = f"exception: {type(exc).__name__}"
    return out


def proxy_expectation(flag_key, flag, ctx, node):
    """The proxy's result where it deliberately differs from Node, else None."""
    reason = node["reason"]
    rules = flag.get("rules", [])
    if reason["kind"] == "RULE_MATCH":
        r = rules[reason["ruleIndex"]]
        if "id" not in ctx and 0 < r["rollout"] < 100:
            return ({"value": False, "reason": {**reason, "inRollout": False}},
                    "rule rollout without a user id is false (Node hashes \"key:undefined\")")
    for i, r in enumerate(rules):
        for c in r["conditions"]:
            if c["operator"] == "regex" and c["value"] in UNSUPPORTED_REGEXES:
                attr = (ctx or {}).get("attributes", {}).get(c["attribute"])
                if ctx is not None and attr not in (None, ""):
                    return ({"value": False,
                             "reason": {"kind": "ERROR", "errorKind": "MALFORMED_FLAG"}},
                            "lookaround/backreference regex is MALFORMED_FLAG")
            if c["operator"] in ALIASES:
                return ("alias", "Go operator alias evaluated as its long name")
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--node-evaluator", required=True)
    ap.add_argument("--python-sdk", required=True)
    args = ap.parse_args()
    python_evaluate = load_python_evaluator(args.python_sdk)

    fixture = {
        "about": __doc__.strip().split("\n\n")[0] + " See gen-eval-vectors.py.",
        "groups": [],
    }
    for name, payload, contexts in groups():
        ctxs = [c for _, c in contexts]
        node = run_node(args.node_evaluator, payload["flags"], ctxs)
        # Alias flags: the same flag with the long operator name, evaluated by Node.
        long_flags = json.loads(json.dumps(payload["flags"]))
        for flag in long_flags.values():
            for r in flag.get("rules", []):
                for c in r["conditions"]:
                    c["operator"] = ALIASES.get(c["operator"], c["operator"])
        node_long = run_node(args.node_evaluator, long_flags, ctxs)
        cases = []
        for (cname, ctx), res, res_long in zip(contexts, node, node_long):
            py = run_python(python_evaluate, payload, ctx)
            expected, node_diff, python_diff, why = {}, {}, {}, []
            for key, flag in payload["flags"].items():
                exp = res[key]
                div = proxy_expectation(key, flag, ctx, res[key])
                if div is not None:
                    exp_div, reason = div
                    if exp_div == "alias":
                        exp_div = res_long[key]
                    if exp_div != res[key]:
                        exp = exp_div
                        node_diff[key] = res[key]
                        if reason not in why:
                            why.append(reason)
                expected[key] = exp
                if py[key] != res[key]["value"]:
                    python_diff[key] = py[key]
            case = {"name": cname, "context": ctx, "expected": expected}
            if node_diff:
                case["node"] = node_diff
                case["divergence"] = "; ".join(why)
            if python_diff:
                case["python"] = python_diff
            cases.append(case)
        fixture["groups"].append({"name": name, "payload": payload, "contexts": cases})

    # One case per line keeps the file diffable.
    lines = ["{", f'  "about": {json.dumps(fixture["about"], ensure_ascii=False)},',
             '  "groups": [']
    for gi, g in enumerate(fixture["groups"]):
        lines.append("    {")
        lines.append(f'      "name": {json.dumps(g["name"])},')
        lines.append(f'      "payload": {json.dumps(g["payload"], ensure_ascii=False)},')
        lines.append('      "contexts": [')
        for ci, c in enumerate(g["contexts"]):
            sep = "," if ci + 1 < len(g["contexts"]) else ""
            lines.append("        " + json.dumps(c, ensure_ascii=False) + sep)
        lines.append("      ]")
        lines.append("    }" + ("," if gi + 1 < len(fixture["groups"]) else ""))
    lines.append("  ]")
    lines.append("}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
