#!/usr/bin/env bash
# The main job on a fresh machine: set up, then dry-run pyproxy on the bundled example cluster
# state and print the iptables-restore input node-a would get (no cluster, nothing touched).
#
#   hack/demo.sh [extra pyproxy flags...]
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

"$REPO_ROOT/hack/setup.sh"
log "running: pyproxy --dry-run --state examples/cluster.yaml --hostname-override node-a --cluster-cidr 10.244.0.0/16,fd00:244::/56 $*"
cd "$REPO_ROOT"
exec "$VENV/bin/pyproxy" --dry-run --state examples/cluster.yaml --hostname-override node-a \
    --cluster-cidr 10.244.0.0/16,fd00:244::/56 "$@"
