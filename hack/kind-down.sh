#!/usr/bin/env bash
# Delete what hack/kind-up.sh made, and nothing else.
#
#   hack/kind-down.sh                     # cluster "pyproxy"
#   CLUSTER_NAME=other hack/kind-down.sh
#
# With the host's docker (ENGINE=host): deletes the kind cluster $CLUSTER_NAME.
# With hack/kind-offline.sh's engine: deletes every kind cluster of that engine
# (only this project's scripts create clusters there), stops that dockerd and
# removes its network namespace and veth. The image cache under
# ~/.cache/pyproxy/kind/ stays, so the next hack/kind-up.sh is fast; remove it
# with rm -rf to start cold.
set -euo pipefail
# shellcheck source=hack/kind-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/kind-lib.sh"

if [[ -n "${KIND_IN_NETNS[*]}" ]]; then
    need kind
    for cluster in $(kind get clusters 2>/dev/null); do
        say "deleting kind cluster '$cluster' (offline engine)"
        run kind delete cluster --name "$cluster"
    done
    run "$KIND_REPO_ROOT/hack/kind-offline.sh" stop
elif [[ -e "/run/netns/$KIND_NETNS" || -e "$KIND_RUN" ]]; then
    say "the offline engine does not answer but left state behind: cleaning it up"
    run "$KIND_REPO_ROOT/hack/kind-offline.sh" stop
else
    need kind
    if cluster_exists; then
        say "deleting kind cluster '$CLUSTER_NAME'"
        run kind delete cluster --name "$CLUSTER_NAME"
    else
        say "no kind cluster named '$CLUSTER_NAME'; nothing to do"
    fi
fi
say "done"
