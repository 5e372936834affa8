#!/usr/bin/env bash
# Failed requests while pyproxy itself is disrupted, under constant load, in the kind
# cluster made by hack/kind-up.sh.
#
#   hack/kind-disruption.sh                    # phases: restart kill9
#   PHASES=kill9 hack/kind-disruption.sh
#   CLUSTER_NAME=pyproxy-control PHASES="to-pyproxy restart kill9 to-kube-proxy" \
#       hack/kind-disruption.sh                # live migration from kube-proxy and back
#
# Setup (namespace pyproxy-disrupt, recreated): 3 agnhost netexec backends behind a
# NodePort Service, and a client pod on the first worker running hack/kind/load.py in
# the pyproxy image (which every cluster of this project has): new connections to the
# ClusterIP, new connections to the NodePort of the second worker, and one keep-alive
# connection opened before the phase and reused throughout.
#
# Phases (each: 5 s of load, the disruption, 5 s more after it converged):
#   restart  kubectl rollout restart daemonset/pyproxy, then rollout status
#   kill9    kill -9 of the pyproxy process on the client's node (from the node); the
#            kubelet restarts the container; the phase ends when the pod is Ready again
#   to-pyproxy, to-kube-proxy
#            on a cluster started with kube-proxy (kind's default iptables mode):
#            hack/migrate.sh (MIGRATE overrides the path) replaces kube-proxy with pyproxy
#            the documented way (docs/deploy.md), or rolls back; pyproxy's manifests get
#            this cluster's API server address (as hack/kind-up.sh gives them)
#
# Prints one line per phase with the counts; exits 1 if any request failed (the goal
# is 0: the rules stay in the kernel while pyproxy is away, and its first sync
# rewrites them in one iptables-restore, leaving conntrack entries alone).
# Environment: CLUSTER_NAME (pyproxy), IMAGE (pyproxy:dev), PHASES, KEEP=1, TIMEOUT (300s).
set -euo pipefail
# shellcheck source=hack/kind-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/kind-lib.sh"

NS=pyproxy-disrupt
PHASES="${PHASES:-restart kill9}"
TIMEOUT="${TIMEOUT:-300s}"
AGNHOST=registry.k8s.io/e2e-test-images/agnhost:2.56
LOAD="$KIND_REPO_ROOT/hack/kind/load.py"

MIGRATE="${MIGRATE:-$KIND_REPO_ROOT/hack/migrate.sh}"

need kind kubectl docker
cluster_exists || die "no kind cluster named '$CLUSTER_NAME'; create it with hack/kind-up.sh"
# The client runs in the pyproxy image; a kube-proxy cluster may not have it yet.
run kind load docker-image "$IMAGE" --name "$CLUSTER_NAME" >/dev/null
read -r W1 W2 _ <<<"$(kcq get nodes -l '!node-role.kubernetes.io/control-plane' -o jsonpath='{.items[*].metadata.name}') _ _"
[[ "$W1" != _ && "$W2" != _ ]] || die "need two worker nodes"
W2_IP="$(kcq get node "$W2" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')"
W2_IP="${W2_IP%% *}"

say "recreating namespace $NS"
kc delete namespace "$NS" --ignore-not-found --wait=true --timeout "$TIMEOUT" >/dev/null
kc create namespace "$NS" >/dev/null
cleanup() {
    rm -rf "${overlay:-/nonexistent}"
    if [[ "${KEEP:-0}" != 1 ]]; then
        kubectl_ns=("${KIND_IN_NETNS[@]}" kubectl --context "$KIND_CONTEXT")
        "${kubectl_ns[@]}" delete namespace "$NS" --wait=false >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT
kc -n "$NS" apply -f - >/dev/null <<YAML
apiVersion: apps/v1
kind: Deployment
metadata:
  name: backend
spec:
  replicas: 3
  selector:
    matchLabels: {app: backend}
  template:
    metadata:
      labels: {app: backend}
    spec:
      containers:
        - name: netexec
          image: ${AGNHOST}
          args: [netexec, --http-port=8080]
          readinessProbe:
            httpGet: {path: /hostname, port: 8080}
            periodSeconds: 2
---
apiVersion: v1
kind: Service
metadata:
  name: backend
spec:
  type: NodePort
  selector: {app: backend}
  ports:
    - {name: http, port: 80, targetPort: 8080, protocol: TCP}
---
apiVersion: v1
kind: Pod
metadata:
  name: client
spec:
  terminationGracePeriodSeconds: 1
  nodeSelector: {kubernetes.io/hostname: ${W1}}
  containers:
    - name: client
      image: ${IMAGE}
      imagePullPolicy: IfNotPresent
      command: [sleep, infinity]
YAML
kc -n "$NS" rollout status deployment/backend --timeout "$TIMEOUT" >/dev/null
kc -n "$NS" wait --for=condition=Ready pod/client --timeout "$TIMEOUT" >/dev/null
CIP="$(kcq -n "$NS" get service backend -o jsonpath='{.spec.clusterIP}')"
NP="$(kcq -n "$NS" get service backend -o jsonpath='{.spec.ports[0].nodePort}')"
say "load: ClusterIP $CIP:80, NodePort $W2_IP:$NP ($W2), from pod client on $W1"

# proxy_pod NODE: the pyproxy pod on NODE.
proxy_pod() {
    kcq -n kube-system get pods -l k8s-app=pyproxy --field-selector "spec.nodeName=$1" \
        -o jsonpath='{.items[0].metadata.name}'
}

overlay="$(mktemp -d)"
write_overlay "$overlay" "$CLUSTER_NAME-control-plane" 6443 iptables "$IMAGE"
migrate() {
    [[ -x "$MIGRATE" ]] || die "$MIGRATE not found (set MIGRATE)"
    KUBECTL="${KIND_IN_NETNS[*]} kubectl --context $KIND_CONTEXT" BACKUP_DIR="$overlay/kube-proxy-backup" \
        "$MIGRATE" "$1" "$overlay/overlay" >"$overlay/migrate.log" 2>&1 ||
        die "$MIGRATE $1 failed: $(tail -5 "$overlay/migrate.log")"
}
phase_to-pyproxy() { migrate to-pyproxy; }
phase_to-kube-proxy() { migrate to-kube-proxy; }

phase_restart() {
    kc -n kube-system rollout restart daemonset/pyproxy >/dev/null
    kc -n kube-system rollout status daemonset/pyproxy --timeout "$TIMEOUT" >/dev/null
}

phase_kill9() {
    local pod restarts pid
    pod="$(proxy_pod "$W1")"
    restarts="$(kcq -n kube-system get pod "$pod" -o jsonpath='{.status.containerStatuses[0].restartCount}')"
    # The node container sees its pods' processes: kill the agent's Python process there.
    pid="$(docker exec "$W1" pgrep -f -o 'bin/pyproxy')"
    say "kill -9 $pid (pyproxy in pod $pod on $W1, restarts so far $restarts)"
    docker exec "$W1" kill -9 "$pid"
    for _ in $(seq 150); do
        now_restarts="$(kcq -n kube-system get pod "$pod" -o jsonpath='{.status.containerStatuses[0].restartCount}')"
        [[ "$now_restarts" != "$restarts" ]] && break
        sleep 1
    done
    [[ "$now_restarts" != "$restarts" ]] || die "the kubelet did not restart pyproxy in $pod"
    kc -n kube-system wait --for=condition=Ready "pod/$pod" --timeout "$TIMEOUT" >/dev/null
}

FAILED=0
printf '%-14s %-22s %-22s %s\n' phase "clusterip ok/failed" "nodeport ok/failed" "established ok/failed/reconnects"
for phase in $PHASES; do
    declare -F "phase_$phase" >/dev/null || die "unknown phase '$phase' (restart, kill9, to-pyproxy, to-kube-proxy)"
    out="$(mktemp)"
    kcq -n "$NS" exec client -- rm -f /tmp/stop
    kcq -n "$NS" exec -i client -- python3 - "$CIP" "$W2_IP" "$NP" /tmp/stop <"$LOAD" >"$out" 2>&1 &
    load_pid=$!
    sleep 5
    t=$SECONDS
    "phase_$phase"
    say "$phase: converged in $((SECONDS - t)) s"
    sleep 5
    kcq -n "$NS" exec client -- touch /tmp/stop
    wait "$load_pid" || die "the load generator failed: $(cat "$out")"
    row="$(python3 -c 'import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
c, n, e = r["clusterip"], r["nodeport"], r["established"]
print(c["failed"] + n["failed"] + e["failed"], "%d/%d" % (c["ok"], c["failed"]),
      "%d/%d" % (n["ok"], n["failed"]), "%d/%d/%d" % (e["ok"], e["failed"], e["reconnects"]))' "$out")"
    read -r failed c n e <<<"$row"
    printf '%-14s %-22s %-22s %s\n' "$phase" "$c" "$n" "$e"
    FAILED=$((FAILED + failed))
    rm -f "$out"
done
if ((FAILED > 0)); then
    say "$FAILED failed request(s)"
    exit 1
fi
say "no failed request in any phase"
