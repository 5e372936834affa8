#!/usr/bin/env bash
# Traffic checks against pyproxy in the kind cluster made by hack/kind-up.sh.
#
#   hack/e2e-kind.sh            # prints PASS/FAIL per check; exits 1 if any failed
#   KEEP=1 hack/e2e-kind.sh     # keep the test namespace afterwards for debugging
#
# What it sets up, in namespace pyproxy-e2e (deleted and recreated on every run):
#   backend        Deployment, 4 agnhost netexec pods spread over the two workers
#                  (HTTP :8080 with /hostname and /clientip, UDP :8081)
#   local-backend  Deployment, 1 netexec pod on the first worker only
#   client-w1/-w2  agnhost pods (curl, nc) on the pod network, one per worker
#   hostclient-w1/-w2  the same with hostNetwork: their source is the node's IP
#   Services:
#     clusterip    ClusterIP, TCP 80 -> 8080 and UDP 81 -> 8081
#     nodeport     NodePort, externalTrafficPolicy Cluster
#     affinity     ClusterIP, sessionAffinity ClientIP
#     local        NodePort, externalTrafficPolicy Local, backed by local-backend
#     noendpoints  ClusterIP whose selector matches no pod
#
# Checks (each prints PASS or FAIL and what it saw):
#   1. ClusterIP answers, from more than one backend over 20 requests
#   2. the Service's DNS name answers (CoreDNS is itself behind a ClusterIP)
#   3. UDP ClusterIP answers
#   4. NodePort answers on every node's InternalIP
#   5. ClientIP affinity: 10 requests from one client reach one backend
#   6. externalTrafficPolicy Local keeps the source: /clientip seen by the
#      backend is the calling node's IP (host client) and the calling pod's IP
#   7. externalTrafficPolicy Local: a node without a local endpoint drops the
#      NodePort traffic of another node (iptables mode; SKIP in ipvs mode)
#   8. externalTrafficPolicy Cluster NodePort masquerades the same traffic
#      (contrast for 6: the backend does not see the calling node's IP)
#   9. a Service without endpoints is refused at once (curl exit 7, connection
#      refused), not left to time out (exit 28)
#
# Environment: CLUSTER_NAME (default pyproxy), KEEP=1, TIMEOUT (default 180s).
set -euo pipefail
# shellcheck source=hack/kind-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/kind-lib.sh"

NS=pyproxy-e2e
AGNHOST=registry.k8s.io/e2e-test-images/agnhost:2.52
TIMEOUT="${TIMEOUT:-180s}"
CURL=(curl -sS --connect-timeout 3 --max-time 5)

need kind kubectl
cluster_exists || die "no kind cluster named '$CLUSTER_NAME'; create it with hack/kind-up.sh"

# --- preflight ---------------------------------------------------------------------
say "preflight: kube-proxy must be absent and pyproxy ready on every node"
if kcq -n kube-system get daemonset kube-proxy >/dev/null 2>&1; then
    die "kube-proxy runs in this cluster: the checks would not test pyproxy"
fi
kc -n kube-system rollout status daemonset/pyproxy --timeout 60s

CP="$(kcq get nodes -l node-role.kubernetes.io/control-plane -o jsonpath='{.items[0].metadata.name}')"
read -r W1 W2 _ <<<"$(kcq get nodes -l '!node-role.kubernetes.io/control-plane' -o jsonpath='{.items[*].metadata.name}') _ _"
[[ -n "$CP" && "$W1" != _ && "$W2" != _ ]] || die "need one control-plane node and two workers (manifests/kind/kind-config.yaml)"

# node_ip NODE: the node's first InternalIP.
node_ip() {
    local ips
    ips="$(kcq get node "$1" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')"
    printf '%s\n' "${ips%% *}"
}
CP_IP="$(node_ip "$CP")"
W1_IP="$(node_ip "$W1")"
W2_IP="$(node_ip "$W2")"
say "nodes: control plane $CP ($CP_IP), workers $W1 ($W1_IP) and $W2 ($W2_IP)"
PROXY_MODE="$(kcq -n kube-system get configmap pyproxy-config -o jsonpath='{.data.PYPROXY_PROXY_MODE}')"
say "pyproxy proxy mode (ConfigMap pyproxy-config): ${PROXY_MODE:-unknown}"

# --- objects -----------------------------------------------------------------------
say "recreating namespace $NS"
kc delete namespace "$NS" --ignore-not-found --wait=true --timeout "$TIMEOUT"
kc create namespace "$NS"
cleanup() {
    if [[ "${KEEP:-0}" == 1 ]]; then
        say "KEEP=1: leaving namespace $NS in place (delete it with: kubectl --context $KIND_CONTEXT delete namespace $NS)"
    else
        say "deleting namespace $NS"
        kubectl --context "$KIND_CONTEXT" delete namespace "$NS" --wait=false >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

say "creating the backends, clients and Services"
kc -n "$NS" apply -f - <<YAML
apiVersion: apps/v1
kind: Deployment
metadata:
  name: backend
spec:
  replicas: 4
  selector:
    matchLabels: {app: backend}
  template:
    metadata:
      labels: {app: backend}
    spec:
      terminationGracePeriodSeconds: 1
      affinity:
        nodeAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
            nodeSelectorTerms:
              - matchExpressions:
                  - {key: node-role.kubernetes.io/control-plane, operator: DoesNotExist}
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: DoNotSchedule
          labelSelector:
            matchLabels: {app: backend}
      containers:
        - name: netexec
          image: ${AGNHOST}
          args: [netexec, --http-port=8080, --udp-port=8081]
          ports:
            - {containerPort: 8080, protocol: TCP}
            - {containerPort: 8081, protocol: UDP}
          readinessProbe:
            httpGet: {path: /hostname, port: 8080}
            periodSeconds: 2
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: local-backend
spec:
  replicas: 1
  selector:
    matchLabels: {app: local-backend}
  template:
    metadata:
      labels: {app: local-backend}
    spec:
      terminationGracePeriodSeconds: 1
      nodeSelector: {kubernetes.io/hostname: ${W1}}
      containers:
        - name: netexec
          image: ${AGNHOST}
          args: [netexec, --http-port=8080, --udp-port=8081]
          ports:
            - {containerPort: 8080, protocol: TCP}
          readinessProbe:
            httpGet: {path: /hostname, port: 8080}
            periodSeconds: 2
---
apiVersion: v1
kind: Pod
metadata:
  name: client-w1
  labels: {role: client}
spec:
  terminationGracePeriodSeconds: 1
  nodeSelector: {kubernetes.io/hostname: ${W1}}
  containers:
    - {name: client, image: "${AGNHOST}", args: [pause]}
---
apiVersion: v1
kind: Pod
metadata:
  name: client-w2
  labels: {role: client}
spec:
  terminationGracePeriodSeconds: 1
  nodeSelector: {kubernetes.io/hostname: ${W2}}
  containers:
    - {name: client, image: "${AGNHOST}", args: [pause]}
---
apiVersion: v1
kind: Pod
metadata:
  name: hostclient-w1
  labels: {role: client}
spec:
  terminationGracePeriodSeconds: 1
  hostNetwork: true
  nodeSelector: {kubernetes.io/hostname: ${W1}}
  containers:
    - {name: client, image: "${AGNHOST}", args: [pause]}
---
apiVersion: v1
kind: Pod
metadata:
  name: hostclient-w2
  labels: {role: client}
spec:
  terminationGracePeriodSeconds: 1
  hostNetwork: true
  nodeSelector: {kubernetes.io/hostname: ${W2}}
  containers:
    - {name: client, image: "${AGNHOST}", args: [pause]}
---
apiVersion: v1
kind: Service
metadata:
  name: clusterip
spec:
  selector: {app: backend}
  ports:
    - {name: http, port: 80, targetPort: 8080, protocol: TCP}
    - {name: udp, port: 81, targetPort: 8081, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata:
  name: nodeport
spec:
  type: NodePort
  externalTrafficPolicy: Cluster
  selector: {app: backend}
  ports:
    - {name: http, port: 80, targetPort: 8080, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata:
  name: affinity
spec:
  selector: {app: backend}
  sessionAffinity: ClientIP
  ports:
    - {name: http, port: 80, targetPort: 8080, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata:
  name: local
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {app: local-backend}
  ports:
    - {name: http, port: 80, targetPort: 8080, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata:
  name: noendpoints
spec:
  selector: {app: nothing-has-this-label}
  ports:
    - {name: http, port: 80, targetPort: 8080, protocol: TCP}
YAML

say "waiting for the backends and clients (timeout $TIMEOUT)"
kc -n "$NS" rollout status deployment/backend --timeout "$TIMEOUT"
kc -n "$NS" rollout status deployment/local-backend --timeout "$TIMEOUT"
kc -n "$NS" wait --for=condition=Ready pod -l role=client --timeout "$TIMEOUT"

BACKENDS="$(kcq -n "$NS" get pods -l app=backend -o jsonpath='{.items[*].metadata.name}')"
LOCAL_BACKEND="$(kcq -n "$NS" get pods -l app=local-backend -o jsonpath='{.items[0].metadata.name}')"
CLIENT_W2_IP="$(kcq -n "$NS" get pod client-w2 -o jsonpath='{.status.podIP}')"
svc_ip() { kcq -n "$NS" get service "$1" -o jsonpath='{.spec.clusterIP}'; }
node_port() { kcq -n "$NS" get service "$1" -o jsonpath='{.spec.ports[0].nodePort}'; }
CLUSTERIP="$(svc_ip clusterip)"
AFFINITY_IP="$(svc_ip affinity)"
NOEP_IP="$(svc_ip noendpoints)"
NODEPORT="$(node_port nodeport)"
LOCAL_NODEPORT="$(node_port local)"
say "backends: $BACKENDS; local backend: $LOCAL_BACKEND on $W1"
say "ClusterIPs: clusterip $CLUSTERIP, affinity $AFFINITY_IP, noendpoints $NOEP_IP; NodePorts: nodeport $NODEPORT, local $LOCAL_NODEPORT"

# --- helpers -----------------------------------------------------------------------
PASSED=0
FAILED=0
FAILED_NAMES=()
pass() {
    PASSED=$((PASSED + 1))
    printf 'PASS  %s: %s\n' "$1" "$2"
}
fail() {
    FAILED=$((FAILED + 1))
    FAILED_NAMES+=("$1")
    printf 'FAIL  %s: %s\n' "$1" "$2"
}

# in_pod POD CMD...: run CMD in POD; its output and exit status are CMD's.
in_pod() {
    local pod=$1
    shift
    kcq -n "$NS" exec "$pod" -- "$@"
}

# retry_until WANT_RC CMD...: run CMD (every 2 s, 15 tries, so about 30 s for
# pyproxy to program a new Service) until its exit status is WANT_RC ("0" or a
# number; "nonzero" for any failure). Prints the last output; returns the last
# exit status.
retry_until() {
    local want=$1 out="" rc=0 i
    shift
    for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do
        rc=0
        out="$("$@" 2>&1)" || rc=$?
        if [[ "$want" == nonzero && "$rc" != 0 ]] || [[ "$rc" == "$want" ]]; then
            break
        fi
        if [[ "$i" != 15 ]]; then
            sleep 2
        fi
    done
    printf '%s\n' "$out"
    return "$rc"
}

# repeat_in_pod POD N URL: GET URL N times from POD in one exec; one answer per
# line, or "CURL_FAILED rc=N" for a failed request.
repeat_in_pod() {
    # shellcheck disable=SC2016  # $1, $2 and $? are expanded by the pod's sh
    in_pod "$1" sh -c 'i=0; while [ "$i" -lt "$1" ]; do i=$((i + 1)); '"${CURL[*]}"' "$2" || echo "CURL_FAILED rc=$?"; echo; done' \
        sh "$2" "$3" | grep -v '^$'
}

# is_one_of WORD LIST: true when WORD is one of the space-separated LIST.
is_one_of() {
    case " $2 " in
        *" $1 "*) return 0 ;;
        *) return 1 ;;
    esac
}

# ip_of HOST:PORT: the address part of netexec's /clientip answer.
ip_of() {
    printf '%s\n' "${1%:*}"
}

# --- checks ------------------------------------------------------------------------
say "running the checks"

# 1. ClusterIP from several backends.
name="ClusterIP $CLUSTERIP:80 answers from several backends"
rc=0
out="$(retry_until 0 in_pod client-w1 "${CURL[@]}" "http://$CLUSTERIP/hostname")" || rc=$?
if [[ "$rc" != 0 ]]; then
    fail "$name" "curl exit $rc: $out"
else
    answers="$(repeat_in_pod client-w1 20 "http://$CLUSTERIP/hostname")" || true
    distinct="$(printf '%s\n' "$answers" | sort -u | tr '\n' ' ' | sed 's/ *$//')"
    ndistinct="$(printf '%s\n' "$answers" | sort -u | grep -c . || true)"
    unexpected=""
    while IFS= read -r a; do
        [[ -z "$a" ]] || is_one_of "$a" "$BACKENDS" || unexpected="$unexpected $a"
    done <<<"$answers"
    if [[ -n "$unexpected" ]]; then
        fail "$name" "answers that are not backend pods:$unexpected"
    elif ((ndistinct >= 2)); then
        pass "$name" "$ndistinct distinct backends in 20 requests: $distinct"
    else
        fail "$name" "only $ndistinct distinct backend(s) in 20 requests: $distinct"
    fi
fi

# 2. DNS name (CoreDNS is reached through the kube-dns ClusterIP).
name="Service DNS name clusterip.$NS.svc.cluster.local answers"
rc=0
out="$(retry_until 0 in_pod client-w1 "${CURL[@]}" "http://clusterip.$NS.svc.cluster.local/hostname")" || rc=$?
if [[ "$rc" == 0 ]] && is_one_of "$out" "$BACKENDS"; then
    pass "$name" "answered by $out"
else
    fail "$name" "curl exit $rc: $out"
fi

# 3. UDP ClusterIP.
name="UDP ClusterIP $CLUSTERIP:81 answers"
rc=0
# shellcheck disable=SC2016  # expanded by the pod's sh
out="$(retry_until 0 in_pod client-w1 sh -c 'r="$(echo hostname | nc -u -w 2 "$1" "$2")"; [ -n "$r" ] && echo "$r"' sh "$CLUSTERIP" 81)" || rc=$?
if [[ "$rc" == 0 ]] && is_one_of "$out" "$BACKENDS"; then
    pass "$name" "answered by $out"
else
    fail "$name" "exit $rc: ${out:-no answer}"
fi

# 4. NodePort on every node.
for node_and_ip in "$CP=$CP_IP" "$W1=$W1_IP" "$W2=$W2_IP"; do
    node="${node_and_ip%%=*}"
    ip="${node_and_ip#*=}"
    name="NodePort $ip:$NODEPORT ($node) answers"
    rc=0
    out="$(retry_until 0 in_pod client-w1 "${CURL[@]}" "http://$ip:$NODEPORT/hostname")" || rc=$?
    if [[ "$rc" == 0 ]] && is_one_of "$out" "$BACKENDS"; then
        pass "$name" "answered by $out"
    else
        fail "$name" "curl exit $rc: $out"
    fi
done

# 5. ClientIP affinity.
name="sessionAffinity ClientIP: 10 requests reach one backend"
rc=0
out="$(retry_until 0 in_pod client-w2 "${CURL[@]}" "http://$AFFINITY_IP/hostname")" || rc=$?
if [[ "$rc" != 0 ]]; then
    fail "$name" "curl exit $rc: $out"
else
    answers="$(repeat_in_pod client-w2 10 "http://$AFFINITY_IP/hostname")" || true
    distinct="$(printf '%s\n' "$answers" | sort -u | tr '\n' ' ' | sed 's/ *$//')"
    ndistinct="$(printf '%s\n' "$answers" | sort -u | grep -c . || true)"
    nanswers="$(printf '%s\n' "$answers" | grep -c . || true)"
    if [[ "$ndistinct" == 1 && "$nanswers" == 10 ]] && is_one_of "$distinct" "$BACKENDS"; then
        pass "$name" "all 10 answered by $distinct"
    else
        fail "$name" "$nanswers answers from $ndistinct distinct: $distinct"
    fi
fi

# 6. externalTrafficPolicy Local keeps the client address.
name="externalTrafficPolicy Local keeps the node source ($W2 -> $W1_IP:$LOCAL_NODEPORT)"
rc=0
out="$(retry_until 0 in_pod hostclient-w2 "${CURL[@]}" "http://$W1_IP:$LOCAL_NODEPORT/clientip")" || rc=$?
if [[ "$rc" == 0 && "$(ip_of "$out")" == "$W2_IP" ]]; then
    pass "$name" "backend saw $out, the address of $W2"
else
    fail "$name" "curl exit $rc: backend saw '$out', expected $W2_IP:<port>"
fi
name="externalTrafficPolicy Local keeps the pod source (client-w2 -> $W1_IP:$LOCAL_NODEPORT)"
rc=0
out="$(retry_until 0 in_pod client-w2 "${CURL[@]}" "http://$W1_IP:$LOCAL_NODEPORT/clientip")" || rc=$?
if [[ "$rc" == 0 && "$(ip_of "$out")" == "$CLIENT_W2_IP" ]]; then
    pass "$name" "backend saw $out, the address of client-w2"
else
    fail "$name" "curl exit $rc: backend saw '$out', expected $CLIENT_W2_IP:<port>"
fi

# 7. externalTrafficPolicy Local: no local endpoint, no service for traffic from
#    another node (traffic from the node itself or from pods is served). In
#    iptables mode kube-proxy DROPs it ("has no local endpoints"), so curl times
#    out (28); a refusal (7) would mean no rule for the NodePort at all. IPVS
#    mode falls back to the cluster's endpoints instead, so the check is
#    iptables-only.
name="externalTrafficPolicy Local: $W2 (no local endpoint) drops $W2_IP:$LOCAL_NODEPORT from $W1 (curl exit 28)"
if [[ "$PROXY_MODE" != iptables ]]; then
    printf 'SKIP  %s: only in iptables mode (this cluster: %s)\n' "$name" "$PROXY_MODE"
else
    rc=0
    out="$(retry_until 28 in_pod hostclient-w1 "${CURL[@]}" "http://$W2_IP:$LOCAL_NODEPORT/hostname")" || rc=$?
    if [[ "$rc" == 28 ]]; then
        pass "$name" "timed out: dropped"
    elif [[ "$rc" == 0 ]]; then
        fail "$name" "answered by $out"
    else
        fail "$name" "curl exit $rc (7 = refused: no NodePort rule on $W2): $out"
    fi
fi

# 8. externalTrafficPolicy Cluster masquerades the same kind of traffic.
name="externalTrafficPolicy Cluster masquerades node traffic ($W2 -> $W1_IP:$NODEPORT)"
rc=0
out="$(retry_until 0 in_pod hostclient-w2 "${CURL[@]}" "http://$W1_IP:$NODEPORT/clientip")" || rc=$?
if [[ "$rc" == 0 && -n "$out" && "$(ip_of "$out")" != "$W2_IP" ]]; then
    pass "$name" "backend saw $out, not $W2_IP"
else
    fail "$name" "curl exit $rc: backend saw '$out'"
fi

# 9. No endpoints: rejected, not dropped.
name="Service without endpoints ($NOEP_IP:80) is refused (curl exit 7)"
rc=0
out="$(retry_until 7 in_pod client-w1 "${CURL[@]}" "http://$NOEP_IP/")" || rc=$?
if [[ "$rc" == 7 ]]; then
    pass "$name" "$out"
elif [[ "$rc" == 28 ]]; then
    fail "$name" "timed out (exit 28): the packet was dropped or unanswered instead of rejected"
else
    fail "$name" "curl exit $rc: $out"
fi

# --- summary -----------------------------------------------------------------------
echo
echo "$PASSED passed, $FAILED failed"
if ((FAILED > 0)); then
    for n in "${FAILED_NAMES[@]}"; do
        echo "  failed: $n"
    done
    say "pyproxy's logs: kubectl --context $KIND_CONTEXT -n kube-system logs -l k8s-app=pyproxy --prefix --tail 50"
    say "rules on a node: docker exec $W1 iptables-save | grep KUBE   (or: ipvsadm -Ln)"
    exit 1
fi
say "all checks passed"
