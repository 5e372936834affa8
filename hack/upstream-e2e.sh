#!/usr/bin/env bash
# Run upstream Kubernetes' own service-proxy e2e specs against pyproxy in the kind
# cluster made by hack/kind-up.sh, and against kube-proxy on an otherwise identical
# cluster as the control, then write a per-test table.
#
#   hack/upstream-e2e.sh                 # the [Conformance] Services specs (what CI runs)
#   FULL=1 hack/upstream-e2e.sh          # every [sig-network] Services spec
#   FOCUS='...' hack/upstream-e2e.sh     # any ginkgo focus
#   PROXIES=pyproxy hack/upstream-e2e.sh # skip the kube-proxy control run
#   DRY_RUN=1 hack/upstream-e2e.sh       # list the selected specs, run none
#
# e2e.test and ginkgo are built from Go modules for v1.34.4 (hack/build-control-plane.sh
# --with-e2e; e2e.test links only the sig-network specs, see hack/kind/e2e/e2e_test.go):
# the release's test tarball is on dl.k8s.io, which CI cannot reach.
#
# The control: a second kind cluster, $CONTROL_CLUSTER, created from
# manifests/kind/kind-config.yaml with kubeProxyMode iptables (kind's default) and the
# same node image. A spec that fails on both is an environment limit; one that fails only
# with pyproxy is a pyproxy bug.
#
# What runs, per cluster (inside the offline engine's network namespace when there is one):
#   ginkgo --nodes=$NODES --focus=$FOCUS --skip=$SKIP e2e.test -- \
#       --kubeconfig=<kind kubeconfig> --provider=skeleton --num-nodes=3 --report-dir=...
# SKIP (default below) removes what cannot apply to kind, each with its reason:
#   Disruptive|Serial        need exclusive use of the cluster / break nodes
#   LoadBalancer|GCE         no cloud load balancer in kind (hack/e2e-kind.sh patches one)
#   ExternalIP               needs routes to the external IPs from the test host
#   Feature:|Alpha|Beta      features behind gates kind does not enable
#   Netpol|NetworkPolicy     a CNI concern; the offline pod network has none
#
# Output: $REPORT_DIR/<proxy>/junit_01.xml and the table $SUMMARY (markdown: spec,
# kube-proxy result, pyproxy result, skip or failure reason). Exit status 1 when a spec
# passes with kube-proxy and not with pyproxy.
#
# Environment: CLUSTER_NAME (pyproxy), CONTROL_CLUSTER (pyproxy-control), NODES (2),
# REPORT_DIR (_artifacts/upstream-e2e), SUMMARY (docs/upstream-e2e.md), FOCUS, SKIP, FULL,
# PROXIES ("kube-proxy pyproxy"), DRY_RUN, TIMEOUT (ginkgo --timeout, default 60m).
set -euo pipefail
# shellcheck source=hack/kind-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/kind-lib.sh"

CONTROL_CLUSTER="${CONTROL_CLUSTER:-pyproxy-control}"
if [[ "${FULL:-0}" == 1 ]]; then
    FOCUS="${FOCUS:-\\[sig-network\\] Services}"
else
    FOCUS="${FOCUS:-\\[sig-network\\] Services.*\\[Conformance\\]}"
fi
SKIP="${SKIP:-Disruptive|Serial|LoadBalancer|GCE|ExternalIP|Feature:|Alpha|Beta|Netpol|NetworkPolicy}"
NODES="${NODES:-2}"
REPORT_DIR="${REPORT_DIR:-$KIND_REPO_ROOT/_artifacts/upstream-e2e}"
SUMMARY="${SUMMARY:-$KIND_REPO_ROOT/docs/upstream-e2e.md}"
PROXIES="${PROXIES:-kube-proxy pyproxy}"
TIMEOUT="${TIMEOUT:-60m}"

need kind kubectl docker
cluster_exists || die "no kind cluster named '$CLUSTER_NAME'; create it with hack/kind-up.sh"

# --- 1. binaries -----------------------------------------------------------------------
say "step 1/4: e2e.test and ginkgo v1.34.4 from Go modules (cached after the first build)"
t=$SECONDS
"$KIND_REPO_ROOT/hack/build-control-plane.sh" --with-e2e >/dev/null
BIN="$("$KIND_REPO_ROOT/hack/build-control-plane.sh" --print-bin-dir)"
say "step 1/4: done in $((SECONDS - t)) s"

# --- 2. the control cluster ------------------------------------------------------------------
node_image="$(docker inspect --format '{{.Config.Image}}' "$CLUSTER_NAME-control-plane")"
if [[ " $PROXIES " == *" kube-proxy "* ]]; then
    if kind get clusters 2>/dev/null | grep -qx -- "$CONTROL_CLUSTER"; then
        say "step 2/4: control cluster '$CONTROL_CLUSTER' (kube-proxy) exists"
    else
        say "step 2/4: creating control cluster '$CONTROL_CLUSTER' with kube-proxy (iptables), node image $node_image"
        control_config="$(mktemp)"
        sed 's/kubeProxyMode: "none"/kubeProxyMode: "iptables"/' "$KIND_CONFIG" >"$control_config"
        grep -q 'kubeProxyMode: "iptables"' "$control_config" || die "could not switch $KIND_CONFIG to kube-proxy"
        t=$SECONDS
        run kind create cluster --name "$CONTROL_CLUSTER" --image "$node_image" --config "$control_config"
        rm -f "$control_config"
        run "${KIND_IN_NETNS[@]}" kubectl --context "kind-$CONTROL_CLUSTER" -n kube-system rollout status daemonset/kube-proxy --timeout 300s
        run "${KIND_IN_NETNS[@]}" kubectl --context "kind-$CONTROL_CLUSTER" -n kube-system rollout status deployment/coredns --timeout 300s
        say "step 2/4: control cluster ready in $((SECONDS - t)) s"
    fi
fi

# --- 3. runs ------------------------------------------------------------------------------
run_e2e() {
    local proxy=$1 cluster=$2 kubeconfig out
    out="$REPORT_DIR/$proxy"
    rm -rf "$out"
    mkdir -p "$out"
    kubeconfig="$out/kubeconfig"
    kind get kubeconfig --name "$cluster" >"$kubeconfig"
    chmod 600 "$kubeconfig"
    local args=(--focus="$FOCUS" --skip="$SKIP" --timeout="$TIMEOUT" --no-color)
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        args+=(--dry-run -v)
    else
        args+=(--nodes="$NODES")
    fi
    say "step 3/4: $proxy on cluster '$cluster' (focus '$FOCUS'); log $out/e2e.log"
    local t=$SECONDS rc=0
    "${KIND_IN_NETNS[@]}" env PATH="$BIN:$PATH" "$BIN/ginkgo" "${args[@]}" "$BIN/e2e.test" -- \
        --kubeconfig="$kubeconfig" --provider=skeleton --num-nodes=3 \
        --report-dir="$out" >"$out/e2e.log" 2>&1 || rc=$?
    say "step 3/4: $proxy: ginkgo exit $rc in $((SECONDS - t)) s; $(grep -E '^(Ran |SUCCESS|FAIL)' "$out/e2e.log" | tr '\n' ' ')"
    RC[$proxy]=$rc
}
declare -A RC
if [[ " $PROXIES " == *" pyproxy "* ]]; then
    if kcq -n kube-system get daemonset kube-proxy >/dev/null 2>&1; then
        die "kube-proxy runs in '$CLUSTER_NAME': the run would not test pyproxy"
    fi
    run_e2e pyproxy "$CLUSTER_NAME"
fi
if [[ " $PROXIES " == *" kube-proxy "* ]]; then
    run_e2e kube-proxy "$CONTROL_CLUSTER"
fi
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    grep -E '^\[sig-network\]|\[It\]' "$REPORT_DIR"/*/e2e.log || true
    exit 0
fi

# --- 4. table ------------------------------------------------------------------------------
say "step 4/4: writing $SUMMARY"
# Only this run's reports: a proxy not in PROXIES shows as "not run", never as an
# older run's results left in REPORT_DIR.
reports=()
for proxy in kube-proxy pyproxy; do
    if [[ " $PROXIES " == *" $proxy "* ]]; then
        reports+=("--$proxy" "$REPORT_DIR/$proxy/junit_01.xml")
    else
        reports+=("--$proxy" /nonexistent/junit_01.xml)
    fi
done
python3 "$KIND_REPO_ROOT/hack/kind/e2e_table.py" --focus "$FOCUS" --skip "$SKIP" "${reports[@]}" \
    --output "$SUMMARY"
# Without the control run there is nothing to compare with: any pyproxy failure counts.
if [[ " $PROXIES " != *" kube-proxy "* && "${RC[pyproxy]:-1}" != 0 ]]; then
    die "upstream e2e failed against pyproxy (ginkgo exit ${RC[pyproxy]:-?}); see $REPORT_DIR/pyproxy/e2e.log"
fi
say "done"
