#!/usr/bin/env bash
# Delete the kind cluster made by hack/kind-up.sh.
#
#   hack/kind-down.sh                     # cluster "pyproxy"
#   CLUSTER_NAME=other hack/kind-down.sh
set -euo pipefail
# shellcheck source=hack/kind-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/kind-lib.sh"

need kind
if cluster_exists; then
    say "deleting kind cluster '$CLUSTER_NAME'"
    run kind delete cluster --name "$CLUSTER_NAME"
    say "done"
else
    say "no kind cluster named '$CLUSTER_NAME'; nothing to do"
fi
