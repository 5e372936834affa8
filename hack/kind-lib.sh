# shellcheck shell=bash
# shellcheck disable=SC2034  # the variables are for the scripts that source this file
# Shared by hack/kind-up.sh, hack/kind-down.sh, hack/e2e-kind.sh and
# hack/upstream-e2e.sh. Source it after `set -euo pipefail`; it only defines
# variables and functions. Kept free of bash-4+ features so the scripts also run
# with macOS's /bin/bash 3.2.
#
# Environment (all optional):
#   CLUSTER_NAME  kind cluster name (default: pyproxy); the kubectl context used
#                 is always kind-$CLUSTER_NAME, never the current context
#   IMAGE         image name:tag to build, load and deploy (default: pyproxy:dev)

KIND_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLUSTER_NAME="${CLUSTER_NAME:-pyproxy}"
KIND_CONTEXT="kind-${CLUSTER_NAME}"
IMAGE="${IMAGE:-pyproxy:dev}"
KIND_CONFIG="${KIND_REPO_ROOT}/manifests/kind/kind-config.yaml"

# say MSG...: a progress line on stderr, prefixed with the script's name.
say() {
    printf '[%s] %s\n' "$(basename "$0")" "$*" >&2
}

# die MSG...: say why, and exit non-zero.
die() {
    say "ERROR: $*"
    exit 1
}

# run CMD ARGS...: print the command, then run it (its exit status is returned).
run() {
    printf '[%s] + %s\n' "$(basename "$0")" "$*" >&2
    "$@"
}

# kc ARGS...: kubectl against the kind cluster's context, printed like run.
kc() {
    run kubectl --context "$KIND_CONTEXT" "$@"
}

# kcq ARGS...: the same without printing (for reads whose output is parsed).
kcq() {
    kubectl --context "$KIND_CONTEXT" "$@"
}

# need CMD...: stop with a clear reason when a required command is missing.
need() {
    local cmd
    for cmd in "$@"; do
        command -v "$cmd" >/dev/null 2>&1 || die "'$cmd' is required but not on PATH"
    done
}

# cluster_exists: true when a kind cluster named $CLUSTER_NAME exists.
cluster_exists() {
    kind get clusters 2>/dev/null | grep -qx -- "$CLUSTER_NAME"
}
