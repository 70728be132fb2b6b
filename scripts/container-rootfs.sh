#!/usr/bin/env bash
# Lays out the container image's files from a static rollgate-proxy binary: the one recipe used
# by the Dockerfile's `source` stage and by scripts/test-container.sh (its `prebuilt` input).
# Usage: scripts/container-rootfs.sh <static binary> <output dir>
#   <out>/root/rollgate-proxy                  the binary (root-owned, 0755)
#   <out>/root/etc/passwd, <out>/root/etc/group   user and group `nonroot` (65532), as in distroless
#   <out>/root/etc/rollgate-proxy/flags.json   the bundled rules file (local mode)
#   <out>/data/                                the snapshot directory, /data (the image gives it
#                                              to the proxy's user; it is a volume)
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: $0 <static rollgate-proxy binary> <output dir>" >&2
  exit 2
fi
bin=$1
out=$2
repo=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$out"
mkdir -p "$out/root/etc/rollgate-proxy" "$out/data"
install -m 0755 "$bin" "$out/root/rollgate-proxy"
install -m 0644 "$repo/examples/flags.json" "$out/root/etc/rollgate-proxy/flags.json"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/data:/sbin/nologin\n' \
  > "$out/root/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$out/root/etc/group"
chmod 0644 "$out/root/etc/passwd" "$out/root/etc/group"
chmod 0755 "$out/data"
