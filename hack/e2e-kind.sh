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
#  10. UDP ClusterIP spreads over several backends (one new flow per request)
#  11. internalTrafficPolicy Local: a pod on the node with the endpoint is
#      answered by it; a pod on a node without one is dropped (curl exit 28)
#  12. LoadBalancer: status.loadBalancer.ingress patched the way a cloud
#      controller would (kubectl patch --subresource=status), reached from two
#      containers on the kind network (outside the pod network, routing the
#      load-balancer IP to a node): loadBalancerSourceRanges admits one and drops
#      the other (iptables mode)
#  13. a rolling update (kubectl rollout restart) of a 3-replica backend while a
#      client sends requests continuously: zero failed requests, and pods of the
#      new ReplicaSet answer before the end (terminating endpoints are not sent
#      new connections; netexec --delay-shutdown keeps old pods serving meanwhile)
#  14. a Service created now is answered (the time it took is printed; the
#      bound is retry_until's, about 30 s)
#
# Environment: CLUSTER_NAME (default pyproxy), KEEP=1, TIMEOUT (default 180s).
set -euo pipefail
# shellcheck source=hack/kind-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/kind-lib.sh"

NS=pyproxy-e2e
# The tag upstream's v1.34.4 e2e tests use (test/utils/image/manifest.go).
AGNHOST=registry.k8s.io/e2e-test-images/agnhost:2.56
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
LB_CLIENTS=(pyproxy-e2e-lb-allowed pyproxy-e2e-lb-denied)
cleanup() {
    docker rm -f "${LB_CLIENTS[@]}" >/dev/null 2>&1 || true
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
---
apiVersion: v1
kind: Service
metadata:
  name: itp-local
spec:
  internalTrafficPolicy: Local
  selector: {app: local-backend}
  ports:
    - {name: http, port: 80, targetPort: 8080, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata:
  name: lb
spec:
  type: LoadBalancer
  allocateLoadBalancerNodePorts: true
  selector: {app: backend}
  ports:
    - {name: http, port: 80, targetPort: 8080, protocol: TCP}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: rolling
spec:
  replicas: 3
  strategy:
    rollingUpdate: {maxSurge: 1, maxUnavailable: 0}
  selector:
    matchLabels: {app: rolling}
  template:
    metadata:
      labels: {app: rolling}
    spec:
      # netexec keeps serving for 10 s after SIGTERM: the time the service proxies
      # need to stop sending it new connections once its endpoint is terminating.
      terminationGracePeriodSeconds: 30
      affinity:
        nodeAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
            nodeSelectorTerms:
              - matchExpressions:
                  - {key: node-role.kubernetes.io/control-plane, operator: DoesNotExist}
      containers:
        - name: netexec
          image: ${AGNHOST}
          args: [netexec, --http-port=8080, --delay-shutdown=10]
          ports:
            - {containerPort: 8080, protocol: TCP}
          readinessProbe:
            httpGet: {path: /readyz, port: 8080}
            periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata:
  name: rolling
spec:
  selector: {app: rolling}
  ports:
    - {name: http, port: 80, targetPort: 8080, protocol: TCP}
YAML

say "waiting for the backends and clients (timeout $TIMEOUT)"
kc -n "$NS" rollout status deployment/backend --timeout "$TIMEOUT"
kc -n "$NS" rollout status deployment/local-backend --timeout "$TIMEOUT"
kc -n "$NS" rollout status deployment/rolling --timeout "$TIMEOUT"
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
ITP_IP="$(svc_ip itp-local)"
ROLLING_IP="$(svc_ip rolling)"
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

# 10. UDP spread: every `nc -u` is a new flow (new source port), balanced anew.
name="UDP ClusterIP $CLUSTERIP:81 spreads over several backends"
# shellcheck disable=SC2016  # expanded by the pod's sh
answers="$(in_pod client-w1 sh -c 'i=0; while [ "$i" -lt 20 ]; do i=$((i + 1)); echo hostname | nc -u -w 1 "$1" "$2"; echo; done' sh "$CLUSTERIP" 81 | grep -v '^$')" || true
ndistinct="$(printf '%s\n' "$answers" | sort -u | grep -c . || true)"
nanswers="$(printf '%s\n' "$answers" | grep -c . || true)"
unexpected=""
while IFS= read -r a; do
    [[ -z "$a" ]] || is_one_of "$a" "$BACKENDS" || unexpected="$unexpected $a"
done <<<"$answers"
if [[ -n "$unexpected" ]]; then
    fail "$name" "answers that are not backend pods:$unexpected"
elif ((ndistinct >= 2)); then
    pass "$name" "$nanswers answers from $ndistinct distinct backends in 20 flows"
else
    fail "$name" "$nanswers answers from only $ndistinct distinct backend(s) in 20 flows"
fi

# 11. internalTrafficPolicy Local: only the node's own endpoints; none, no service.
name="internalTrafficPolicy Local: client-w1 ($W1, has the endpoint) is answered by it"
rc=0
out="$(retry_until 0 in_pod client-w1 "${CURL[@]}" "http://$ITP_IP/hostname")" || rc=$?
if [[ "$rc" == 0 && "$out" == "$LOCAL_BACKEND" ]]; then
    pass "$name" "answered by $out"
else
    fail "$name" "curl exit $rc: '$out', expected $LOCAL_BACKEND"
fi
name="internalTrafficPolicy Local: client-w2 ($W2, no local endpoint) is dropped (curl exit 28)"
rc=0
out="$(retry_until 28 in_pod client-w2 "${CURL[@]}" "http://$ITP_IP/hostname")" || rc=$?
if [[ "$rc" == 28 ]]; then
    pass "$name" "timed out: dropped"
else
    fail "$name" "curl exit $rc: $out"
fi

# 12. LoadBalancer with source ranges, from outside the pod network.
name="LoadBalancer: loadBalancerSourceRanges admits one outside client and drops another"
kind_subnet="$(docker network inspect kind --format '{{range .IPAM.Config}}{{.Subnet}} {{end}}' | tr ' ' '\n' | grep -v : | head -n1)"
# An unused address inside the kind network: traffic to it never leaves the
# engine's networks, even if no rule catches it.
LB_IP="$(python3 -c 'import ipaddress, sys; print(ipaddress.ip_network(sys.argv[1])[-6])' "$kind_subnet")"
docker rm -f "${LB_CLIENTS[@]}" >/dev/null 2>&1 || true
for c in "${LB_CLIENTS[@]}"; do
    docker run -d --name "$c" --network kind --cap-add NET_ADMIN "$AGNHOST" pause >/dev/null
    docker exec "$c" ip route add "$LB_IP/32" via "$W1_IP"
done
ALLOWED_IP="$(docker inspect "${LB_CLIENTS[0]}" --format '{{.NetworkSettings.Networks.kind.IPAddress}}')"
DENIED_IP="$(docker inspect "${LB_CLIENTS[1]}" --format '{{.NetworkSettings.Networks.kind.IPAddress}}')"
kc -n "$NS" patch service lb --type merge -p "{\"spec\": {\"loadBalancerSourceRanges\": [\"$ALLOWED_IP/32\"]}}" >/dev/null
kc -n "$NS" patch service lb --subresource=status --type merge \
    -p "{\"status\": {\"loadBalancer\": {\"ingress\": [{\"ip\": \"$LB_IP\"}]}}}" >/dev/null
say "load balancer $LB_IP (routed via $W1_IP); allowed client $ALLOWED_IP, other client $DENIED_IP"
rc=0
out="$(retry_until 0 docker exec "${LB_CLIENTS[0]}" "${CURL[@]}" "http://$LB_IP/hostname")" || rc=$?
if [[ "$rc" != 0 ]] || ! is_one_of "$out" "$BACKENDS"; then
    fail "$name" "allowed client $ALLOWED_IP: curl exit $rc: $out"
elif [[ "$PROXY_MODE" != iptables ]]; then
    printf 'SKIP  %s: the drop half only in iptables mode (this cluster: %s)\n' "$name" "$PROXY_MODE"
else
    rc=0
    denied="$(retry_until 28 docker exec "${LB_CLIENTS[1]}" "${CURL[@]}" "http://$LB_IP/hostname")" || rc=$?
    if [[ "$rc" == 28 ]]; then
        pass "$name" "$ALLOWED_IP answered by $out; $DENIED_IP timed out (dropped)"
    else
        fail "$name" "client $DENIED_IP outside the ranges: curl exit $rc: $denied"
    fi
fi

# 13. Rolling update under constant load.
name="rolling update of deployment/rolling under constant load: zero failed requests"
old_pods="$(kcq -n "$NS" get pods -l app=rolling -o jsonpath='{.items[*].metadata.name}')"
rc=0
retry_until 0 in_pod client-w2 "${CURL[@]}" "http://$ROLLING_IP/hostname" >/dev/null || rc=$?
if [[ "$rc" != 0 ]]; then
    fail "$name" "the Service does not answer before the update (curl exit $rc)"
else
    load_log="$(mktemp)"
    # One new connection per request, back to back, until /tmp/stop-load exists.
    # shellcheck disable=SC2016  # expanded by the pod's sh
    in_pod client-w2 sh -c 'rm -f /tmp/stop-load; while [ ! -f /tmp/stop-load ]; do r="$('"${CURL[*]}"' "$1" 2>&1)" || r="FAILED $r"; echo "$r"; done' sh "http://$ROLLING_IP/hostname" >"$load_log" 2>&1 &
    load_pid=$!
    sleep 3
    kc -n "$NS" rollout restart deployment/rolling >/dev/null
    kc -n "$NS" rollout status deployment/rolling --timeout "$TIMEOUT" >/dev/null
    # Until the last old pod is gone: its shutdown delay is part of the update.
    for _ in $(seq 60); do
        left=0
        for p in $old_pods; do
            kcq -n "$NS" get pod "$p" >/dev/null 2>&1 && left=1
        done
        ((left == 0)) && break
        sleep 1
    done
    sleep 3
    in_pod client-w2 touch /tmp/stop-load
    wait "$load_pid" || true
    total="$(grep -c . "$load_log" || true)"
    failed="$(grep -c '^FAILED' "$load_log" || true)"
    new_pods="$(kcq -n "$NS" get pods -l app=rolling -o jsonpath='{.items[*].metadata.name}')"
    from_new=0
    for p in $new_pods; do
        grep -qx "$p" "$load_log" && from_new=$((from_new + 1))
    done
    if [[ "$failed" == 0 && "$total" -gt 20 && "$from_new" -ge 1 ]]; then
        pass "$name" "$total requests, 0 failed, answered by $from_new pod(s) of the new ReplicaSet"
    else
        fail "$name" "$total requests, $failed failed (first: $(grep -m1 '^FAILED' "$load_log" || true)), $from_new new pod(s) answered"
    fi
    rm -f "$load_log"
fi

# 14. A Service created after pyproxy started.
name="a Service created now is answered"
kc -n "$NS" create service clusterip late --tcp=80:8080 >/dev/null
kc -n "$NS" set selector service late app=backend >/dev/null
LATE_IP="$(svc_ip late)"
t=$SECONDS
rc=0
out="$(retry_until 0 in_pod client-w1 "${CURL[@]}" "http://$LATE_IP/hostname")" || rc=$?
if [[ "$rc" == 0 ]] && is_one_of "$out" "$BACKENDS"; then
    pass "$name" "$LATE_IP answered by $out about $((SECONDS - t)) s after creation"
else
    fail "$name" "curl exit $rc after $((SECONDS - t)) s: $out"
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
