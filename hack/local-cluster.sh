#!/usr/bin/env bash
# Run a local etcd + kube-apiserver on 127.0.0.1 for trying pyproxy by hand.
#
# The integration tests start their own control plane (tests/netlab/controlplane.py);
# this script is for people: `up` leaves a real API server running in the background
# so `kubectl` and `pyproxy --kubeconfig ... --dry-run` can be pointed at it, `down`
# stops it and throws its data away. There is no kubelet or controller manager:
# create EndpointSlices directly. default/kubernetes gets no endpoints
# (--endpoint-reconciler-type=none): its only address would be 127.0.0.1, which
# the API rejects as an endpoint address.
#
# Usage:
#   hack/local-cluster.sh up     build if needed, start, print the admin kubeconfig path
#   hack/local-cluster.sh down   stop and remove the data
#
# Files (all under .local/, which git ignores):
#   .local/kubeconfig          admin (group system:masters)
#   .local/kubeconfig-proxy    user system:kube-proxy (ClusterRole system:node-proxier)
#   .local/cluster/            certificates, token file, etcd data, logs, pid files
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOCAL_DIR="$REPO_ROOT/.local"
STATE_DIR="$LOCAL_DIR/cluster"
ADMIN_KUBECONFIG="$LOCAL_DIR/kubeconfig"
PROXY_KUBECONFIG="$LOCAL_DIR/kubeconfig-proxy"
SERVICE_CIDR=10.96.0.0/16
# First address of SERVICE_CIDR: the ClusterIP of default/kubernetes.
SERVICE_CIDR_FIRST_IP=10.96.0.1
READY_TIMEOUT=60

log() { printf '[local-cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

is_running() {
    local pidfile="$STATE_DIR/$1.pid"
    [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

stop_process() {
    local name=$1 pidfile="$STATE_DIR/$1.pid" pid i
    [[ -f "$pidfile" ]] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid"
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name did not stop within 10s; killing it"
            kill -KILL "$pid"
        fi
    fi
    rm -f "$pidfile"
}

# Print N distinct free TCP ports on 127.0.0.1.
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

random_token() { openssl rand -hex 24; }

generate_certs() {
    local d=$1
    log "generating CA, serving certificate and service-account keys in $d"
    openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=pyproxy-local-ca" \
        -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
        -keyout "$d/apiserver.key" -out "$d/apiserver.csr" 2>/dev/null
    printf '%s\n' \
        "subjectAltName=IP:127.0.0.1,IP:$SERVICE_CIDR_FIRST_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local" \
        "extendedKeyUsage=serverAuth" >"$d/apiserver.ext"
    openssl x509 -req -in "$d/apiserver.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" \
        -CAcreateserial -days 365 -extfile "$d/apiserver.ext" -out "$d/apiserver.crt" 2>/dev/null
    openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
    openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
}

# write_kubeconfig FILE SERVER USER TOKEN
write_kubeconfig() {
    local file=$1 server=$2 user=$3 token=$4 ca_data
    ca_data=$(base64 -w0 <"$STATE_DIR/ca.crt")
    (
        umask 077
        cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: $server
    certificate-authority-data: $ca_data
users:
- name: $user
  user:
    token: $token
contexts:
- name: local
  context:
    cluster: local
    user: $user
current-context: local
EOF
    )
}

# wait_for NAME URL [curl args...]: poll URL until it answers 2xx; fail if NAME exits.
wait_for() {
    local name=$1 url=$2 i
    shift 2
    for ((i = 0; i < READY_TIMEOUT * 5; i++)); do
        if curl -fsS --max-time 2 "$@" "$url" >/dev/null 2>&1; then
            return 0
        fi
        is_running "$name" || break
        sleep 0.2
    done
    log "$name did not become ready at $url; last lines of $STATE_DIR/$name.log:"
    tail -n 20 "$STATE_DIR/$name.log" >&2 || true
    return 1
}

# start NAME COMMAND...: start a daemon detached from this shell, logging to NAME.log.
start() {
    local name=$1
    shift
    setsid "$@" >"$STATE_DIR/$name.log" 2>&1 </dev/null &
    echo $! >"$STATE_DIR/$name.pid"
}

cmd_up() {
    if is_running kube-apiserver; then
        log "already running"
        echo "$ADMIN_KUBECONFIG"
        return
    fi
    command -v openssl >/dev/null || die "openssl is missing (apt-get install -y openssl)"
    command -v curl >/dev/null || die "curl is missing (apt-get install -y curl)"

    local bin_dir
    bin_dir=$("$REPO_ROOT/hack/build-control-plane.sh")

    cmd_down
    mkdir -p "$STATE_DIR"
    chmod 700 "$STATE_DIR"
    trap 'log "start failed; stopping what was started"; cmd_down' EXIT

    generate_certs "$STATE_DIR"
    local admin_token proxy_token
    admin_token=$(random_token)
    proxy_token=$(random_token)
    (
        umask 077
        printf '%s,admin,admin,"system:masters"\n' "$admin_token"
        printf '%s,system:kube-proxy,system:kube-proxy\n' "$proxy_token"
    ) >"$STATE_DIR/tokens.csv"

    local etcd_port etcd_peer_port api_port
    read -r etcd_port etcd_peer_port api_port <<<"$(free_ports 3)"
    local etcd_url="http://127.0.0.1:$etcd_port"
    local server="https://127.0.0.1:$api_port"

    log "starting etcd on $etcd_url"
    start etcd "$bin_dir/etcd" \
        --name=local \
        --data-dir="$STATE_DIR/etcd" \
        --listen-client-urls="$etcd_url" \
        --advertise-client-urls="$etcd_url" \
        --listen-peer-urls="http://127.0.0.1:$etcd_peer_port" \
        --initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer_port" \
        --initial-cluster="local=http://127.0.0.1:$etcd_peer_port" \
        --unsafe-no-fsync
    wait_for etcd "$etcd_url/health"

    log "starting kube-apiserver on $server"
    start kube-apiserver "$bin_dir/kube-apiserver" \
        --etcd-servers="$etcd_url" \
        --bind-address=127.0.0.1 \
        --advertise-address=127.0.0.1 \
        --secure-port="$api_port" \
        --tls-cert-file="$STATE_DIR/apiserver.crt" \
        --tls-private-key-file="$STATE_DIR/apiserver.key" \
        --client-ca-file="$STATE_DIR/ca.crt" \
        --token-auth-file="$STATE_DIR/tokens.csv" \
        --authorization-mode=RBAC \
        --allow-privileged=true \
        --endpoint-reconciler-type=none \
        --service-cluster-ip-range="$SERVICE_CIDR" \
        --service-account-issuer=https://kubernetes.default.svc \
        --service-account-key-file="$STATE_DIR/sa.pub" \
        --service-account-signing-key-file="$STATE_DIR/sa.key"
    # /readyz is open to anonymous users once the bootstrap RBAC policy exists.
    wait_for kube-apiserver "$server/readyz" --cacert "$STATE_DIR/ca.crt"

    write_kubeconfig "$ADMIN_KUBECONFIG" "$server" admin "$admin_token"
    write_kubeconfig "$PROXY_KUBECONFIG" "$server" system:kube-proxy "$proxy_token"
    trap - EXIT
    log "ready: $bin_dir/kubectl --kubeconfig $ADMIN_KUBECONFIG get ns (logs in $STATE_DIR)"
    echo "$ADMIN_KUBECONFIG"
}

cmd_down() {
    stop_process kube-apiserver
    stop_process etcd
    rm -rf "$STATE_DIR" "$ADMIN_KUBECONFIG" "$PROXY_KUBECONFIG"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    *) die "usage: $0 up|down" ;;
esac
