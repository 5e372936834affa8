#!/usr/bin/env bash
# Create a kind cluster without kube-proxy and run pyproxy in its place.
#
#   hack/kind-up.sh
#
# Online or offline, chosen by ENGINE (default auto):
#   host     a docker that already answers (docker info) is used as is: kind pulls
#            its kindest/node image, the pyproxy image builds FROM
#            python:3.11-slim-bookworm, agnhost is pulled by the nodes.
#   offline  no registry needed (auto picks it when no docker answers): as root,
#            hack/kind-offline.sh installs Debian's docker.io, containerd, runc and
#            debootstrap, starts a dockerd of its own inside the network namespace
#            pyproxy-kind (the host's iptables, ip_forward and routes stay untouched),
#            and builds, cached under ~/.cache/pyproxy/kind/, kind itself, a node
#            image holding every image kubeadm needs, a pod-network fixture
#            (hack/kind/podnet.py: routes pod CIDRs between nodes, no masquerade, no
#            network policy) and agnhost; the pyproxy image builds from the same
#            Dockerfile on a local Python base (--build-arg PYTHON_IMAGE, wheels
#            prepared on the host). kubectl then runs inside that namespace.
#            A cold build takes tens of minutes on 2 cores; a warm one, seconds.
#
# Steps (each prints what it runs):
#   0. offline only: hack/kind-offline.sh engine, then hack/kind-offline.sh images
#   1. kind create cluster --config manifests/kind/kind-config.yaml
#      (kubeProxyMode: none, one control plane, two workers, kindnet online or the
#      pod-network fixture offline)
#   2. docker build -t $IMAGE .            (skipped with SKIP_BUILD=1)
#   3. kind load docker-image $IMAGE
#   4. kubectl apply -k of manifests/, with the ConfigMap pyproxy-config filled
#      in for this cluster (see below)
#   5. kubectl -n kube-system rollout status ds/pyproxy, then wait for the
#      nodes and CoreDNS, which need working Service IPs.
#
# The API server address: no ClusterIP answers before pyproxy runs, so pyproxy
# reaches the API server through the control-plane node. kind names that node
# "<cluster-name>-control-plane", kubeadm's controlPlaneEndpoint in kind is
# "<cluster-name>-control-plane:6443", and every node resolves that name through
# the container runtime's DNS (kindnet reaches the API server the same way). The
# script copies manifests/ into a temporary directory next to a kustomize
# overlay that replaces KUBERNETES_SERVICE_HOST/PORT (and PYPROXY_PROXY_MODE)
# in pyproxy-config, and applies that overlay: the result is `kubectl apply -k
# manifests/` with the ConfigMap values for this cluster, and manifests/ itself
# is never modified.
#
# Environment (all optional):
#   CLUSTER_NAME     kind cluster name (default pyproxy); re-running with an
#                    existing cluster skips creation and redeploys pyproxy
#   IMAGE            image to build, load and run (default pyproxy:dev; name:tag)
#   SKIP_BUILD=1     do not run docker build (the image must exist locally)
#   PROXY_MODE       iptables (default) or ipvs
#   API_SERVER_HOST  override the address put in the ConfigMap
#                    (default "$CLUSTER_NAME-control-plane")
#   API_SERVER_PORT  default 6443
#   KIND_NODE_IMAGE  kindest/node image for `kind create cluster --image`
#                    (offline: the node image hack/kind-offline.sh built)
#   ENGINE           auto (default), host or offline (see above)
#   TIMEOUT          rollout and readiness timeout (default 300s)
set -euo pipefail
# shellcheck source=hack/kind-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/kind-lib.sh"

PROXY_MODE="${PROXY_MODE:-iptables}"
API_SERVER_HOST="${API_SERVER_HOST:-${CLUSTER_NAME}-control-plane}"
API_SERVER_PORT="${API_SERVER_PORT:-6443}"
TIMEOUT="${TIMEOUT:-300s}"

case "$PROXY_MODE" in
    iptables | ipvs) ;;
    *) die "PROXY_MODE must be iptables or ipvs, not '$PROXY_MODE'" ;;
esac
case "$IMAGE" in
    *:*) ;;
    *) die "IMAGE must be name:tag, not '$IMAGE'" ;;
esac

ENGINE="${ENGINE:-auto}"
build_args=()
if [[ "$ENGINE" == auto ]]; then
    if [[ -n "${KIND_IN_NETNS[*]}" ]]; then
        ENGINE=offline # hack/kind-offline.sh's engine already runs (kind-lib.sh found it)
    elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        ENGINE=host
    else
        ENGINE=offline
    fi
fi
case "$ENGINE" in
    host) say "engine: the docker that answers here (images come from their registries)" ;;
    offline)
        say "engine: hack/kind-offline.sh (no registry needed; everything built locally and cached)"
        run "$KIND_REPO_ROOT/hack/kind-offline.sh" engine
        use_offline_engine
        run "$KIND_REPO_ROOT/hack/kind-offline.sh" images
        KIND_NODE_IMAGE="${KIND_NODE_IMAGE:-pyproxy-kind/node:v1.34.4}"
        build_args=(--build-arg PYTHON_IMAGE=pyproxy-kind/python:3.11-offline --build-arg OS_PACKAGES=preinstalled --network none)
        ;;
    *) die "ENGINE must be auto, host or offline, not '$ENGINE'" ;;
esac

need docker kind kubectl
say "checking that docker answers"
docker info >/dev/null 2>&1 || die "docker is installed but its daemon does not answer (docker info failed)"

# --- 1. cluster ------------------------------------------------------------------
if cluster_exists; then
    say "step 1/5: kind cluster '$CLUSTER_NAME' exists; reusing it"
else
    say "step 1/5: creating kind cluster '$CLUSTER_NAME' without kube-proxy ($KIND_CONFIG)"
    create=(kind create cluster --name "$CLUSTER_NAME" --config "$KIND_CONFIG")
    if [[ -n "${KIND_NODE_IMAGE:-}" ]]; then
        create+=(--image "$KIND_NODE_IMAGE")
    fi
    run "${create[@]}"
fi
say "checking that kube-proxy is absent (kubeProxyMode: none)"
if kcq -n kube-system get daemonset kube-proxy >/dev/null 2>&1; then
    die "cluster '$CLUSTER_NAME' runs kube-proxy; it was not created from $KIND_CONFIG (delete it with hack/kind-down.sh)"
fi

# --- 2. image --------------------------------------------------------------------
if [[ "${SKIP_BUILD:-0}" == 1 ]]; then
    say "step 2/5: SKIP_BUILD=1: not building; using the local image $IMAGE"
    docker image inspect "$IMAGE" >/dev/null 2>&1 || die "image $IMAGE does not exist locally"
else
    say "step 2/5: building image $IMAGE from $KIND_REPO_ROOT/Dockerfile"
    t=$SECONDS
    DOCKER_BUILDKIT=1 run docker build "${build_args[@]}" -t "$IMAGE" "$KIND_REPO_ROOT"
    say "image built in $((SECONDS - t)) s"
fi

# --- 3. load ---------------------------------------------------------------------
say "step 3/5: loading $IMAGE into the nodes of '$CLUSTER_NAME'"
run kind load docker-image "$IMAGE" --name "$CLUSTER_NAME"

# --- 4. manifests ----------------------------------------------------------------
say "step 4/5: applying manifests/ with API server $API_SERVER_HOST:$API_SERVER_PORT, proxy mode $PROXY_MODE"
work="$(mktemp -d "${TMPDIR:-/tmp}/pyproxy-kind.XXXXXX")"
trap 'rm -rf "$work"' EXIT
write_overlay "$work" "$API_SERVER_HOST" "$API_SERVER_PORT" "$PROXY_MODE" "$IMAGE"
say "the ConfigMap pyproxy-config that will be applied:"
kubectl kustomize "$work/overlay" >"$work/rendered.yaml"
awk 'function flush() { if (doc ~ /\nkind: ConfigMap\n/) printf "%s", doc; doc = "\n" }
     BEGIN { doc = "\n" } /^---$/ { flush(); next } { doc = doc $0 "\n" } END { flush() }' \
    "$work/rendered.yaml" >&2

existed=0
if kcq -n kube-system get daemonset pyproxy >/dev/null 2>&1; then
    existed=1
fi
kc apply -k "$work/overlay"
if [[ "$existed" == 1 ]]; then
    # Same tag, new image contents (kind load replaced it) or a changed
    # ConfigMap: neither restarts running pods by itself.
    say "pyproxy was already deployed: restarting it to pick up the new image and config"
    kc -n kube-system rollout restart daemonset/pyproxy
fi

# --- 5. wait ---------------------------------------------------------------------
say "step 5/5: waiting for pyproxy on every node (timeout $TIMEOUT)"
if ! kc -n kube-system rollout status daemonset/pyproxy --timeout "$TIMEOUT"; then
    say "pyproxy did not become ready; its pods and their last log lines:"
    kcq -n kube-system get pods -l k8s-app=pyproxy -o wide >&2 || true
    kcq -n kube-system logs -l k8s-app=pyproxy --tail 20 --prefix >&2 || true
    die "rollout of daemonset/pyproxy failed"
fi
say "waiting for all nodes to be Ready"
kc wait --for=condition=Ready nodes --all --timeout "$TIMEOUT"
say "waiting for CoreDNS (it reaches the API server through the kubernetes ClusterIP, so it needs pyproxy)"
kc -n kube-system rollout status deployment/coredns --timeout "$TIMEOUT"

kc -n kube-system get pods -l k8s-app=pyproxy -o wide
say "done: pyproxy runs in place of kube-proxy in kind cluster '$CLUSTER_NAME' (context $KIND_CONTEXT)"
say "next: hack/e2e-kind.sh (traffic checks), hack/upstream-e2e.sh (upstream [sig-network] Services), hack/kind-down.sh"
