#!/usr/bin/env bash
# Checks the deploy recipes with every tool that runs offline here: the alert rules with
# promtool (syntax and unit tests), the systemd unit with systemd-analyze (verify and the
# offline security score), the Kubernetes manifests against the Kubernetes JSON schemas
# (kubernetes-validate, pinned, from PyPI), and cross-checks of the compose file, manifests
# and dashboard (scripts/check-deploy.py). The container image itself: scripts/test-container.sh.
# Usage: ./scripts/check-deploy.sh   (a step of ./scripts/test.sh; installs what it needs as root)
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VALIDATE_VERSION=1.37.0
venv=target/deploy-check-venv

need_apt() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing $1: install Debian's $2 package (or run as root)" >&2
    exit 1
  fi
  if [ -z "${apt_updated:-}" ]; then
    apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >/dev/null
}

echo "-- alert rules (promtool)"
command -v promtool >/dev/null || need_apt promtool prometheus
promtool check rules deploy/monitoring/alerts.yml
promtool test rules deploy/monitoring/alerts.test.yml

echo "-- systemd unit (systemd-analyze)"
if command -v systemd-analyze >/dev/null; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # verify also checks that ExecStart exists; the binary is not installed here, so point it at
  # an existing executable (the rest of the unit is verified as written).
  sed "s|^ExecStart=/usr/local/bin/rollgate-proxy|ExecStart=$(command -v true)|" \
    deploy/systemd/rollgate-proxy.service > "$tmp/rollgate-proxy.service"
  # verify exits 0 on unknown keys and bad values, only warning: any output is a failure.
  out=$(systemd-analyze verify "$tmp/rollgate-proxy.service" 2>&1) || { echo "$out" >&2; exit 1; }
  if [ -n "$out" ]; then
    echo "systemd-analyze verify complained:" >&2
    echo "$out" >&2
    exit 1
  fi
  # Exposure score 0 (locked down) .. 10 (unprotected); the unit scores 1.4; --threshold counts in tenths.
  systemd-analyze security --offline=yes --threshold=20 "$tmp/rollgate-proxy.service" | tail -1
  grep -q '^DynamicUser=yes' deploy/systemd/rollgate-proxy.service
  grep -q '^StateDirectory=rollgate-proxy' deploy/systemd/rollgate-proxy.service
  grep -q '^LimitNOFILE=' deploy/systemd/rollgate-proxy.service
else
  echo "skipped: systemd-analyze is not installed"
fi

echo "-- Kubernetes manifests (kubernetes-validate ${KUBERNETES_VALIDATE_VERSION}, strict schemas)"
if [ ! -x "$venv/bin/kubernetes-validate" ] \
  || ! "$venv/bin/kubernetes-validate" --version 2>/dev/null | grep -q "$KUBERNETES_VALIDATE_VERSION"; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check \
    "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}"
fi
# 1.30: the oldest version with the preStop `sleep` action on by default. The ServiceMonitor
# (a CRD) has no schema offline: scripts/check-deploy.py checks it.
for version in 1.30.0 1.37.0; do
  "$venv/bin/kubernetes-validate" --strict --quiet -k "$version" deploy/kubernetes/rollgate-proxy.yaml
done

echo "-- compose file, manifests and dashboard cross-checks"
"$venv/bin/python" scripts/check-deploy.py
