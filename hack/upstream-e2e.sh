#!/usr/bin/env bash
# Run upstream Kubernetes' "[sig-network] Services" e2e tests against the kind
# cluster made by hack/kind-up.sh, the way other kube-proxy replacements
# (Cilium, kpng) test themselves.
#
#   hack/upstream-e2e.sh               # download (once), then run
#   PRINT_ONLY=1 hack/upstream-e2e.sh  # only print the commands it would run
#   DRY_RUN=1 hack/upstream-e2e.sh     # let ginkgo list the selected tests, run none
#
# FOR USERS' MACHINES ONLY. It downloads the Kubernetes test tarball
# (kubernetes-test-<os>-<arch>.tar.gz from dl.k8s.io, several hundred MB) for
# the cluster's exact server version; pyproxy's CI cannot reach that host and
# has no container engine for kind, so CI never runs this script. CI instead
# validates the manifests and RBAC against a real kube-apiserver
# (tests/integration/test_manifests.py).
#
# What runs:
#   ginkgo --nodes=$NODES --focus=$FOCUS --skip=$SKIP e2e.test -- \
#       --kubeconfig=<kind kubeconfig> --provider=skeleton --report-dir=$REPORT_DIR
# FOCUS defaults to '\[sig-network\] Services' (add 'Networking Granular
# Checks: Services' with FOCUS=... for the next step of the ladder).
# SKIP defaults to the skip list of Cilium's and kpng's kind jobs, narrowed to
# what does not apply to a service proxy in kind (Cilium's also skips
# externalTrafficPolicy and "rejected" tests, which pyproxy is meant to pass):
#   Disruptive|Serial        need exclusive use of the cluster / break nodes
#   LoadBalancer|GCE         no cloud load balancers in kind
#   ExternalIP               needs routes to the external IPs from the test host
#   KubeProxy|kube-proxy     tests that inspect kube-proxy itself (its pod,
#                            ConfigMap, or iptables canary)
#   Feature:|Alpha|Beta      features behind gates
#   Netpol|NetworkPolicy     a CNI concern, not the service proxy's
# The skip list may only shrink over time.
#
# Environment (all optional):
#   CLUSTER_NAME  kind cluster (default pyproxy)
#   K8S_VERSION   test binaries' version (default: the cluster's server version)
#   E2E_CACHE     where the binaries are kept (default ~/.cache/pyproxy/e2e/<version>)
#   FOCUS, SKIP   ginkgo regular expressions (defaults above)
#   NODES         ginkgo parallel processes (default 4; Cilium uses 10)
#   REPORT_DIR    JUnit reports (default ./_artifacts/upstream-e2e)
#   PROVIDER      e2e.test --provider (default skeleton, as kind's own e2e job;
#                 "local" also works)
set -euo pipefail
# shellcheck source=hack/kind-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/kind-lib.sh"

FOCUS="${FOCUS:-\\[sig-network\\] Services}"
SKIP="${SKIP:-Disruptive|Serial|LoadBalancer|GCE|ExternalIP|KubeProxy|kube-proxy|Feature:|Alpha|Beta|Netpol|NetworkPolicy}"
NODES="${NODES:-4}"
REPORT_DIR="${REPORT_DIR:-$PWD/_artifacts/upstream-e2e}"
PROVIDER="${PROVIDER:-skeleton}"

need kind kubectl curl tar
cluster_exists || die "no kind cluster named '$CLUSTER_NAME'; create it with hack/kind-up.sh"

# --- 1. versions and platform ---------------------------------------------------------
if [[ -z "${K8S_VERSION:-}" ]]; then
    say "step 1/4: reading the cluster's server version"
    K8S_VERSION="$(kcq get --raw /version | sed -n 's/^[[:space:]]*"gitVersion":[[:space:]]*"\([^"]*\)".*/\1/p')"
    [[ -n "$K8S_VERSION" ]] || die "could not read gitVersion from the API server's /version"
fi
case "$(uname -s)" in
    Linux) os=linux ;;
    Darwin) os=darwin ;;
    *) die "unsupported OS $(uname -s); the test tarball exists for linux and darwin" ;;
esac
case "$(uname -m)" in
    x86_64 | amd64) arch=amd64 ;;
    aarch64 | arm64) arch=arm64 ;;
    *) die "unsupported architecture $(uname -m)" ;;
esac
say "step 1/4: Kubernetes $K8S_VERSION, test binaries for $os/$arch"

E2E_CACHE="${E2E_CACHE:-$HOME/.cache/pyproxy/e2e/$K8S_VERSION}"
url="https://dl.k8s.io/${K8S_VERSION}/kubernetes-test-${os}-${arch}.tar.gz"
ginkgo="$E2E_CACHE/ginkgo"
e2e_test="$E2E_CACHE/e2e.test"
kubeconfig="$E2E_CACHE/kubeconfig-$CLUSTER_NAME"

if [[ "${PRINT_ONLY:-0}" == 1 ]]; then
    say "PRINT_ONLY=1: the commands, not run:"
    printf '%s\n' \
        "mkdir -p '$E2E_CACHE'" \
        "curl -fL '$url' | tar -xzf - -C '$E2E_CACHE' --strip-components=3 kubernetes/test/bin/ginkgo kubernetes/test/bin/e2e.test" \
        "kind get kubeconfig --name '$CLUSTER_NAME' > '$kubeconfig'" \
        "'$ginkgo' --nodes=$NODES --focus='$FOCUS' --skip='$SKIP' '$e2e_test' -- --kubeconfig='$kubeconfig' --provider=$PROVIDER --report-dir='$REPORT_DIR'"
    exit 0
fi

# --- 2. binaries ---------------------------------------------------------------------
if [[ -x "$ginkgo" && -x "$e2e_test" ]]; then
    say "step 2/4: ginkgo and e2e.test already in $E2E_CACHE"
else
    say "step 2/4: downloading $url (ginkgo and e2e.test only) into $E2E_CACHE"
    run mkdir -p "$E2E_CACHE"
    # Download first, then extract: a failed download must not leave half a binary.
    run curl -fL --retry 3 -o "$E2E_CACHE/kubernetes-test.tar.gz" "$url"
    run tar -xzf "$E2E_CACHE/kubernetes-test.tar.gz" -C "$E2E_CACHE" --strip-components=3 \
        kubernetes/test/bin/ginkgo kubernetes/test/bin/e2e.test
    run rm -f "$E2E_CACHE/kubernetes-test.tar.gz"
    [[ -x "$ginkgo" && -x "$e2e_test" ]] || die "the tarball did not contain kubernetes/test/bin/{ginkgo,e2e.test}"
fi

# --- 3. kubeconfig -------------------------------------------------------------------
say "step 3/4: writing the kubeconfig of kind cluster '$CLUSTER_NAME' to $kubeconfig"
kind get kubeconfig --name "$CLUSTER_NAME" >"$kubeconfig"
chmod 600 "$kubeconfig"
say "checking that pyproxy, not kube-proxy, serves this cluster"
if kcq -n kube-system get daemonset kube-proxy >/dev/null 2>&1; then
    die "kube-proxy runs in this cluster: the e2e tests would not test pyproxy"
fi
kc -n kube-system rollout status daemonset/pyproxy --timeout 60s

# --- 4. run --------------------------------------------------------------------------
mkdir -p "$REPORT_DIR"
ginkgo_args=(--focus="$FOCUS" --skip="$SKIP")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    # ginkgo only dry-runs serially.
    ginkgo_args+=(--dry-run -v)
else
    ginkgo_args+=(--nodes="$NODES")
fi
say "step 4/4: running upstream e2e (focus '$FOCUS'); JUnit reports in $REPORT_DIR"
run "$ginkgo" "${ginkgo_args[@]}" "$e2e_test" -- \
    --kubeconfig="$kubeconfig" \
    --provider="$PROVIDER" \
    --report-dir="$REPORT_DIR" \
    --disable-log-dump=true
say "done: upstream [sig-network] Services e2e passed against pyproxy"
