#!/usr/bin/env python3
"""Cross-checks the deploy recipes against each other and the proxy's documented contract.

Run by scripts/check-deploy.sh (after schema validation): the compose file, the Kubernetes
manifests (including the ServiceMonitor, for which no schema is available offline) and the
Grafana dashboard. Exits 1 with one line per failed check.
"""
import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
failures = []


def check(ok, message):
    if not ok:
        failures.append(message)


def duration_seconds(text):
    match = re.fullmatch(r"(\d+)(ms|s|m|h)", str(text))
    if not match:
        raise ValueError(f"not a duration: {text!r}")
    value, unit = int(match.group(1)), match.group(2)
    return value * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def dockerfile_env():
    text = (ROOT / "Dockerfile").read_text()
    runtime = text.split("AS runtime", 1)[1]
    env = {}
    for key, value in re.findall(r"(ROLLGATE_[A-Z_]+|PORT)=(\S+)", runtime):
        env[key] = value
    return runtime, env


def compose():
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = doc["services"]["rollgate-proxy"]
    env = dict(item.split("=", 1) for item in service["environment"])
    # As in the pattern: the key and base URL come from the environment.
    check(env.get("ROLLGATE_API_KEY", "").startswith("${ROLLGATE_API_KEY"), "compose: ROLLGATE_API_KEY from the environment")
    check("ROLLGATE_BASE_URL" in env, "compose: ROLLGATE_BASE_URL set")
    check(service.get("restart") == "unless-stopped", "compose: restart unless-stopped (as the pattern)")
    check(service.get("build") == ".", "compose: builds the Dockerfile")
    health = service.get("healthcheck", {})
    check(health.get("test") == ["CMD", "/rollgate-proxy", "healthcheck"], "compose: health check runs the healthcheck subcommand")
    check(duration_seconds(health.get("timeout", "0s")) <= 3, "compose: health check timeout <= 3s (pattern)")
    check(any(str(v).endswith(":/data") for v in service.get("volumes", [])), "compose: snapshot volume on /data")
    check(any(str(p).endswith(":3001") for p in service.get("ports", [])), "compose: publishes 3001")
    _, image_env = dockerfile_env()
    grace = duration_seconds(service.get("stop_grace_period", "10s"))
    shutdown = duration_seconds(image_env["ROLLGATE_PROXY_SHUTDOWN_TIMEOUT"])
    check(grace > shutdown, f"compose: stop_grace_period {grace}s above the image's shutdown timeout {shutdown}s")
    check(image_env.get("ROLLGATE_PROXY_SNAPSHOT_FILE", "").startswith("/data/"), "image: snapshot file in /data")


def kubernetes():
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes/rollgate-proxy.yaml").read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    for kind in ["Deployment", "PodDisruptionBudget", "Service", "ServiceMonitor"]:
        check(kind in by_kind, f"kubernetes: a {kind}")
    deployment = by_kind["Deployment"]
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    check(spec["replicas"] == 3, "kubernetes: 3 replicas")
    check(container["readinessProbe"]["httpGet"]["path"] == "/ready", "kubernetes: readiness on /ready")
    check(container["livenessProbe"]["httpGet"]["path"] == "/live", "kubernetes: liveness on /live")
    check("preStop" in container.get("lifecycle", {}), "kubernetes: a preStop hook")
    pre_stop = container["lifecycle"]["preStop"].get("sleep", {}).get("seconds", 0)
    shutdown = duration_seconds(env.get("ROLLGATE_PROXY_SHUTDOWN_TIMEOUT", "10s"))
    check(pod["terminationGracePeriodSeconds"] > pre_stop + shutdown,
          "kubernetes: terminationGracePeriodSeconds above preStop + shutdown timeout")
    check("requests" in container.get("resources", {}) and "limits" in container["resources"], "kubernetes: resources")
    check(pod["securityContext"].get("runAsNonRoot") is True, "kubernetes: runs as non-root")
    check(container["securityContext"].get("readOnlyRootFilesystem") is True, "kubernetes: read-only root filesystem")
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    check(env.get("ROLLGATE_PROXY_SNAPSHOT_FILE", "").startswith("/data/") and "/data" in mounts,
          "kubernetes: the snapshot file is on a mounted volume")
    check(any(ref.get("secretRef") for ref in container.get("envFrom", [])), "kubernetes: the key comes from a Secret")
    check("ROLLGATE_API_KEY" not in env, "kubernetes: no key in the manifest")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    check(ports.get("http") == 3001, "kubernetes: container port http = 3001")
    selects = lambda selector: all(labels.get(k) == v for k, v in selector.items())
    check(selects(spec["selector"]["matchLabels"]), "kubernetes: Deployment selector matches its pods")
    pdb = by_kind["PodDisruptionBudget"]["spec"]
    check(selects(pdb["selector"]["matchLabels"]), "kubernetes: PDB selects the pods")
    check(0 < int(pdb.get("minAvailable", 0)) < spec["replicas"], "kubernetes: PDB lets one pod go at a time")
    service = by_kind["Service"]
    check(selects(service["spec"]["selector"]), "kubernetes: Service selects the pods")
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    check(service_ports.get("http", {}).get("targetPort") in ("http", 3001), "kubernetes: Service targets the http port")
    monitor = by_kind["ServiceMonitor"]
    check(monitor["apiVersion"] == "monitoring.coreos.com/v1", "ServiceMonitor: apiVersion")
    check(all(service["metadata"]["labels"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items()),
          "ServiceMonitor: selects the Service")
    endpoint = monitor["spec"]["endpoints"][0]
    check(endpoint.get("port") in service_ports, "ServiceMonitor: scrapes a named Service port")
    check(endpoint.get("path") == "/api/metrics", "ServiceMonitor: path /api/metrics")


def dashboard():
    dash = json.loads((ROOT / "deploy/monitoring/grafana-dashboard.json").read_text())
    check(dash.get("uid") == "rollgate-proxy" and dash.get("title"), "dashboard: uid and title")
    ids = [p["id"] for p in dash["panels"]]
    check(len(ids) == len(set(ids)), "dashboard: unique panel ids")
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    check(len(exprs) >= 10, "dashboard: panels with queries")
    for expr in exprs:
        check(expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), f"dashboard: balanced {expr}")
        check("rollgate_proxy_" in expr, f"dashboard: queries the proxy's metrics: {expr}")
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ["clients", "request rate", "latency", "fan-out", "data age", "breaker", "upstream", "drops"]:
        check(topic in titles, f"dashboard: a panel about {topic}")


for section in (compose, kubernetes, dashboard):
    try:
        section()
    except (KeyError, IndexError, TypeError, ValueError) as error:
        failures.append(f"{section.__name__}: malformed ({error!r})")
for failure in failures:
    print(f"FAIL {failure}")
if failures:
    sys.exit(1)
print("ok: compose file, Kubernetes manifests and dashboard are consistent")
