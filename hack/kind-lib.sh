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
    run "${KIND_IN_NETNS[@]}" kubectl --context "$KIND_CONTEXT" "$@"
}

# kcq ARGS...: the same without printing (for reads whose output is parsed).
kcq() {
    "${KIND_IN_NETNS[@]}" kubectl --context "$KIND_CONTEXT" "$@"
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

# write_overlay DIR API_HOST API_PORT PROXY_MODE IMAGE: DIR/base (a copy of
# manifests/) and DIR/overlay, a kustomization of it with the image and the
# ConfigMap values for one cluster; `kubectl apply -k DIR/overlay` deploys pyproxy
# there and manifests/ itself is never modified.
write_overlay() {
    local dir=$1 host=$2 port=$3 mode=$4 image=$5
    mkdir -p "$dir/base" "$dir/overlay"
    cp "$KIND_REPO_ROOT"/manifests/*.yaml "$dir/base/"
    # JSON-patch `replace` fails when a key is missing, so a renamed key in
    # manifests/configmap.yaml stops the caller instead of being ignored.
    cat >"$dir/overlay/kustomization.yaml" <<YAML
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../base
images:
  - name: pyproxy
    newName: "${image%:*}"
    newTag: "${image##*:}"
patches:
  - target:
      version: v1
      kind: ConfigMap
      name: pyproxy-config
      namespace: kube-system
    patch: |-
      - op: replace
        path: /data/KUBERNETES_SERVICE_HOST
        value: "${host}"
      - op: replace
        path: /data/KUBERNETES_SERVICE_PORT
        value: "${port}"
      - op: replace
        path: /data/PYPROXY_PROXY_MODE
        value: "${mode}"
YAML
}

# --- the offline engine (hack/kind-offline.sh) ------------------------------------
# Where hack/kind-offline.sh keeps its dockerd: a socket of its own and a network
# namespace. When that engine runs, docker and kind talk to it (DOCKER_HOST) and
# kubectl runs inside the namespace, where the API server's published port is.
KIND_CACHE="${PYPROXY_CACHE:-$HOME/.cache/pyproxy}/kind"
KIND_RUN=/run/pyproxy-kind
KIND_NETNS=pyproxy-kind
KIND_VETH_HOST=pyproxy-kind0
KIND_DOCKER_SOCK="$KIND_RUN/docker.sock"
KIND_IN_NETNS=()

# use_offline_engine: point docker, kind and kubectl at hack/kind-offline.sh's engine.
# Debian's docker CLI comes first on PATH: another docker CLI (without BuildKit's
# built-in frontend) may be installed in /usr/local/bin.
use_offline_engine() {
    export DOCKER_HOST="unix://$KIND_DOCKER_SOCK"
    export PATH="$KIND_RUN/bin:$KIND_CACHE/bin:${PYPROXY_CACHE:-$HOME/.cache/pyproxy}/control-plane/v1.34.4/bin:$PATH"
    mkdir -p "$KIND_RUN/bin"
    ln -sfn /usr/bin/docker "$KIND_RUN/bin/docker"
    KIND_IN_NETNS=(nsenter --net="/run/netns/$KIND_NETNS")
}

# offline_engine_running: true when hack/kind-offline.sh's dockerd answers.
offline_engine_running() {
    [[ -S "$KIND_DOCKER_SOCK" ]] && /usr/bin/docker --host "unix://$KIND_DOCKER_SOCK" info >/dev/null 2>&1
}

if [[ -z "${DOCKER_HOST:-}" ]] && offline_engine_running; then
    use_offline_engine
fi
