#!/usr/bin/env bash
# Replace kube-proxy (iptables mode) by pyproxy on a running cluster, or roll
# back, without a moment in which a node has no Service rules.
#
#   hack/migrate.sh to-pyproxy     [KUSTOMIZATION]   # default: manifests/
#   hack/migrate.sh to-kube-proxy  [KUSTOMIZATION]
#   hack/migrate.sh status
#
# Why no cleanup: pyproxy writes kube-proxy's own iptables chains (KUBE-SERVICES,
# KUBE-SVC-*, KUBE-SEP-*, ...), both leave their rules in the kernel when they
# stop, and each one's first full sync rewrites every chain the other wrote in
# one atomic iptables-restore (and deletes the service chains it does not
# need). So the old rules keep serving until the new proxy replaces them. A
# `--cleanup` between the two (the procedure docs/deploy.md used to describe)
# is what leaves the node without rules: never run it for iptables <-> iptables.
#
# to-pyproxy:
#   1. save the kube-proxy DaemonSet and ConfigMap to $BACKUP_DIR (once);
#   2. stop kube-proxy without deleting its DaemonSet: add a nodeSelector no
#      node matches ($PAUSE_LABEL=true); its pods get SIGTERM and leave their
#      rules; wait until they are gone (no two proxies on a node at once);
#   3. kubectl apply -k KUSTOMIZATION, then wait until every pyproxy pod is
#      Ready (its /healthz answers; its first sync follows its first complete
#      lists from the API server, and the old rules serve until then).
# to-kube-proxy (the reverse):
#   1. delete the pyproxy DaemonSet (its pods leave their rules) and wait until
#      its pods are gone;
#   2. remove that nodeSelector from the kube-proxy DaemonSet; wait for its
#      rollout (kube-proxy's first sync rewrites pyproxy's chains);
#   3. delete the rest of pyproxy (kubectl delete -k --ignore-not-found).
# Every step checks before it acts, so running a direction twice, or after an
# interruption, is safe; an object already gone is not an error.
#
# kube-proxy in ipvs mode: to-pyproxy refuses unless ALLOW_MODE_CHANGE=1 (see
# docs/deploy.md for the extra step). nftables mode: pyproxy deletes kube-proxy's
# tables itself after its first sync on each node.
#
# Environment (all optional):
#   KUBECTL            kubectl command (default: kubectl), e.g.
#                      "kubectl --context prod"
#   NAMESPACE          default kube-system
#   KUBE_PROXY_DS      kube-proxy's DaemonSet (default kube-proxy)
#   KUBE_PROXY_CM      kube-proxy's ConfigMap (default kube-proxy)
#   PYPROXY_DS         default pyproxy
#   PAUSE_LABEL        default pyproxy-migration/kube-proxy-stopped
#   BACKUP_DIR         default ./kube-proxy-backup
#   TIMEOUT            seconds to wait for pods and rollouts (default 300)
#   ALLOW_MODE_CHANGE  1: go on although kube-proxy is not in iptables mode
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
read -r -a KUBECTL_CMD <<<"${KUBECTL:-kubectl}"
NAMESPACE="${NAMESPACE:-kube-system}"
KUBE_PROXY_DS="${KUBE_PROXY_DS:-kube-proxy}"
KUBE_PROXY_CM="${KUBE_PROXY_CM:-kube-proxy}"
PYPROXY_DS="${PYPROXY_DS:-pyproxy}"
PAUSE_LABEL="${PAUSE_LABEL:-pyproxy-migration/kube-proxy-stopped}"
BACKUP_DIR="${BACKUP_DIR:-kube-proxy-backup}"
TIMEOUT="${TIMEOUT:-300}"

say() {
    printf '[migrate] %s\n' "$*" >&2
}

die() {
    say "ERROR: $*"
    exit 1
}

# kc ARGS...: kubectl in $NAMESPACE, printed before it runs.
kc() {
    printf '[migrate] + %s -n %s %s\n' "${KUBECTL_CMD[*]}" "$NAMESPACE" "$*" >&2
    "${KUBECTL_CMD[@]}" -n "$NAMESPACE" "$@"
}

# kcq ARGS...: the same, silent (reads whose output is parsed).
kcq() {
    "${KUBECTL_CMD[@]}" -n "$NAMESPACE" "$@"
}

exists() { # KIND NAME
    [[ -n "$(kcq get "$1" "$2" --ignore-not-found -o name)" ]]
}

# The label selector of a DaemonSet's pods, as key=value,...
# shellcheck disable=SC2016  # a Go template, not shell: nothing to expand
selector_of() { # DS
    kcq get daemonset "$1" \
        -o go-template='{{range $k, $v := .spec.selector.matchLabels}}{{$k}}={{$v}},{{end}}' |
        sed 's/,$//'
}

# wait_no_pods SELECTOR WHAT: until no pod matches (terminating ones included).
wait_no_pods() {
    local deadline=$((SECONDS + TIMEOUT)) pods
    while :; do
        pods="$(kcq get pods -l "$1" -o name)"
        [[ -z "$pods" ]] && return 0
        ((SECONDS < deadline)) || die "$2 pods still there after ${TIMEOUT}s: $pods"
        sleep 2
    done
}

# The JSON-pointer form of $PAUSE_LABEL ("/" is written "~1").
pause_pointer() {
    printf '/spec/template/spec/nodeSelector/%s' "${PAUSE_LABEL//\//~1}"
}

kube_proxy_paused() {
    [[ "$(kcq get daemonset "$KUBE_PROXY_DS" -o go-template="{{with .spec.template.spec.nodeSelector}}{{index . \"$PAUSE_LABEL\"}}{{end}}")" == "true" ]]
}

# kube-proxy's mode from its ConfigMap ("" = the default, iptables).
kube_proxy_mode() {
    exists configmap "$KUBE_PROXY_CM" || return 0
    kcq get configmap "$KUBE_PROXY_CM" -o go-template='{{index .data "config.conf"}}' |
        sed -n 's/^mode:[[:space:]]*"\{0,1\}\([a-z]*\)"\{0,1\}.*/\1/p' | head -n 1
}

to_pyproxy() {
    local kustomization="$1" mode selector
    if exists daemonset "$KUBE_PROXY_DS"; then
        mode="$(kube_proxy_mode)"
        case "${mode:-iptables}" in
            iptables) ;;
            nftables)
                say "kube-proxy runs in nftables mode: pyproxy deletes its tables (ip/ip6 kube-proxy) after its first sync on each node (docs/deploy.md)"
                ;;
            *)
                [[ "${ALLOW_MODE_CHANGE:-0}" == 1 ]] ||
                    die "kube-proxy runs in $mode mode: pyproxy's iptables rules take over, but $mode leftovers need the extra step in docs/deploy.md; set ALLOW_MODE_CHANGE=1 to go on"
                say "kube-proxy runs in $mode mode (ALLOW_MODE_CHANGE=1): remove its leftovers after this script, as docs/deploy.md says"
                ;;
        esac
        mkdir -p "$BACKUP_DIR"
        if [[ ! -s "$BACKUP_DIR/daemonset.yaml" ]]; then
            say "1. saving kube-proxy's DaemonSet and ConfigMap in $BACKUP_DIR/"
            kcq get daemonset "$KUBE_PROXY_DS" -o yaml >"$BACKUP_DIR/daemonset.yaml"
            if exists configmap "$KUBE_PROXY_CM"; then
                kcq get configmap "$KUBE_PROXY_CM" -o yaml >"$BACKUP_DIR/configmap.yaml"
            fi
        else
            say "1. $BACKUP_DIR/daemonset.yaml exists; keeping it"
        fi
        selector="$(selector_of "$KUBE_PROXY_DS")"
        if kube_proxy_paused; then
            say "2. kube-proxy already has nodeSelector $PAUSE_LABEL=true"
        else
            say "2. stopping kube-proxy (its rules stay in the kernel and keep serving)"
            kc patch daemonset "$KUBE_PROXY_DS" --type=merge \
                -p "{\"spec\":{\"template\":{\"spec\":{\"nodeSelector\":{\"$PAUSE_LABEL\":\"true\"}}}}}"
        fi
        say "   waiting until no kube-proxy pod is left ($selector)"
        wait_no_pods "$selector" kube-proxy
    else
        say "1-2. no DaemonSet $NAMESPACE/$KUBE_PROXY_DS: nothing to stop"
    fi
    say "3. deploying pyproxy from $kustomization (its first sync takes over kube-proxy's chains)"
    kc apply -k "$kustomization"
    kc rollout status "daemonset/$PYPROXY_DS" --timeout="${TIMEOUT}s"
    say "done: pyproxy serves every node; kube-proxy's DaemonSet is kept (stopped) for rollback"
}

to_kube_proxy() {
    local kustomization="$1" selector mode
    exists daemonset "$KUBE_PROXY_DS" ||
        die "no DaemonSet $NAMESPACE/$KUBE_PROXY_DS to go back to; create it from $BACKUP_DIR/ (docs/deploy.md) and run this again. Nothing was changed."
    mode="$(kube_proxy_mode)"
    if [[ "${mode:-iptables}" != iptables ]]; then
        say "note: kube-proxy will start in $mode mode; only a rollback to iptables mode is free of a gap (docs/deploy.md)"
    fi
    if exists daemonset "$PYPROXY_DS"; then
        selector="$(selector_of "$PYPROXY_DS")"
        say "1. stopping pyproxy (its rules stay in the kernel and keep serving)"
        kc delete daemonset "$PYPROXY_DS" --ignore-not-found
        say "   waiting until no pyproxy pod is left ($selector)"
        wait_no_pods "$selector" pyproxy
    else
        say "1. no DaemonSet $NAMESPACE/$PYPROXY_DS: nothing to stop"
    fi
    if kube_proxy_paused; then
        say "2. starting kube-proxy again (its first sync takes over pyproxy's chains)"
        kc patch daemonset "$KUBE_PROXY_DS" --type=json \
            -p "[{\"op\":\"remove\",\"path\":\"$(pause_pointer)\"}]"
    else
        say "2. kube-proxy has no nodeSelector $PAUSE_LABEL: not stopped by this script"
    fi
    kc rollout status "daemonset/$KUBE_PROXY_DS" --timeout="${TIMEOUT}s"
    say "3. removing the rest of pyproxy"
    kc delete -k "$kustomization" --ignore-not-found
    say "done: kube-proxy serves every node"
}

status() {
    local ds
    for ds in "$KUBE_PROXY_DS" "$PYPROXY_DS"; do
        if exists daemonset "$ds"; then
            kcq get daemonset "$ds" -o wide
        else
            say "no DaemonSet $NAMESPACE/$ds"
        fi
    done
    if exists daemonset "$KUBE_PROXY_DS" && kube_proxy_paused; then
        say "kube-proxy is stopped by this script (nodeSelector $PAUSE_LABEL=true)"
    fi
}

usage() {
    sed -n '2,8p' "$0" >&2
    exit 2
}

[[ $# -ge 1 ]] || usage
command -v "${KUBECTL_CMD[0]}" >/dev/null 2>&1 || die "'${KUBECTL_CMD[0]}' is required but not on PATH"
case "$1" in
    to-pyproxy) to_pyproxy "${2:-$REPO_ROOT/manifests}" ;;
    to-kube-proxy) to_kube_proxy "${2:-$REPO_ROOT/manifests}" ;;
    status) status ;;
    *) usage ;;
esac
