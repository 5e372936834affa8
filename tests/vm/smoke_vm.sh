#!/usr/bin/env bash
# Smoke check of the IPVS test VM's kernel and tools. Run it inside the VM:
#
#   hack/vm.sh run -- tests/vm/smoke_vm.sh
#
# (a) ip_vs loads and ipvsadm lists        (b) a kube-ipvs0 dummy link in a netns
# (c) netns + veth, ping across            (d) pyroute2.IPVS() (repo venv) adds a virtual
#     service and a masq real server in a netns and lists them back
# (e) iptables-nft and iptables-legacy (+ -restore) inside a netns
# (f) a real TCP connection through the IPVS virtual service (curl -> VIP -> backend netns)
# Outside the VM it fails at (a): the host kernel has no ip_vs.
# Everything is created in throwaway namespaces and removed at exit.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYPROXY_PYTHON:-$REPO_ROOT/.venv/bin/python}"
NODE="pyproxy-smoke-node-$$" # the "node": kube-ipvs0, IPVS services, iptables
POD="pyproxy-smoke-pod-$$"   # a backend "pod" behind a veth
VIP=10.96.0.10
NODE_IP=10.244.0.1
POD_IP=10.244.0.2

say() { printf '[smoke] %s\n' "$*" >&2; }
now() { printf '%s\n' "${EPOCHREALTIME/,/.}"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

cleanup() {
    if [[ -n "${SERVER_PID:-}" ]]; then kill "$SERVER_PID" 2>/dev/null || true; fi
    ip netns del "$NODE" 2>/dev/null || true
    ip netns del "$POD" 2>/dev/null || true
}
trap cleanup EXIT

check_a_ip_vs() {
    modprobe ip_vs
    test -e /proc/net/ip_vs
    ipvsadm -Ln
}

check_b_dummy() {
    ip netns add "$NODE"
    ip -n "$NODE" link set lo up
    ip -n "$NODE" link add kube-ipvs0 type dummy
    ip -n "$NODE" addr add "$VIP/32" dev kube-ipvs0
    ip -n "$NODE" -br addr show kube-ipvs0
}

check_c_veth() {
    ip netns add "$POD"
    ip -n "$POD" link set lo up
    ip link add vsmk$$ netns "$NODE" type veth peer name eth0 netns "$POD"
    ip -n "$NODE" addr add "$NODE_IP/24" dev "vsmk$$"
    ip -n "$NODE" link set "vsmk$$" up
    ip -n "$POD" addr add "$POD_IP/24" dev eth0
    ip -n "$POD" link set eth0 up
    ip -n "$POD" route add default via "$NODE_IP"
    ip netns exec "$NODE" ping -c1 -W2 "$POD_IP"
}

check_d_pyroute2_ipvs() {
    "$PY" - "$NODE" "$VIP" "$POD_IP" <<'EOF'
import socket
import sys

import pyroute2
from pyroute2 import IPVS, IPVSDest, IPVSService

netns, vip, pod_ip = sys.argv[1:4]
print("pyroute2", pyroute2.__version__ if hasattr(pyroute2, "__version__") else "?")
ipvs = IPVS(netns=netns)
try:
    # Traps: the scheduler must be explicit; real servers default to direct routing
    # (fwd_method 3), NAT needs fwd_method 0 (masq).
    svc = IPVSService(addr=vip, port=80, protocol=socket.IPPROTO_TCP, sched_name="rr")
    ipvs.service("add", service=svc)
    ipvs.dest("add", service=svc, dest=IPVSDest(addr=pod_ip, port=8080, fwd_method=0, weight=1))
    services = [IPVSService.from_message(m) for m in ipvs.service("dump")]
    assert len(services) == 1, services
    got = services[0]
    assert (got["addr"], got["port"], got["protocol"], got["sched_name"]) == (
        vip, 80, socket.IPPROTO_TCP, "rr"), got
    dests = [IPVSDest.from_message(m) for m in ipvs.dest("dump", service=svc)]
    assert len(dests) == 1, dests
    d = dests[0]
    # Trap: IPVSDest.from_message() starts from the class defaults and does not map the
    # forwarding method back, so d["fwd_method"] reads 3 (the default) whatever the kernel
    # holds. The kernel's value is in the raw attribute.
    fwd = d["IPVS_DEST_ATTR_FWD_METHOD"]
    assert (d["addr"], d["port"], fwd, d["weight"]) == (pod_ip, 8080, 0, 1), d
    print(f"service {got['addr']}:{got['port']} sched={got['sched_name']} -> "
          f"dest {d['addr']}:{d['port']} fwd_method={fwd} (masq) weight={d['weight']}")
finally:
    ipvs.close()
EOF
    # Cross-check with ipvsadm: the real server must show as Masq.
    # (Not `tee /dev/stderr`: in the guest /dev/stderr is a separate vng port.)
    local table
    table="$(ip netns exec "$NODE" ipvsadm -Ln)"
    printf '%s\n' "$table"
    grep -Eq "$POD_IP:8080 +Masq" <<<"$table"
}

check_e_iptables() {
    local v
    for v in nft legacy; do
        ip netns exec "$NODE" "iptables-$v" -t nat -N KUBE-SMOKE
        ip netns exec "$NODE" "iptables-$v" -t nat -A KUBE-SMOKE -m comment --comment smoke -j RETURN
        ip netns exec "$NODE" "iptables-$v-restore" --noflush <<EOF
*filter
:KUBE-SMOKE-FILTER - [0:0]
-A KUBE-SMOKE-FILTER -m conntrack --ctstate INVALID -j DROP
COMMIT
EOF
        ip netns exec "$NODE" "iptables-$v-save" | grep -E 'KUBE-SMOKE' >&2
        ip netns exec "$NODE" "iptables-$v" -t nat -S KUBE-SMOKE | grep -q 'smoke'
        say "iptables-$v: ok ($(ip netns exec "$NODE" "iptables-$v" --version))"
    done
    ip netns exec "$NODE" nft list tables >&2
}

check_f_ipvs_traffic() {
    # A backend "pod" answering HTTP with its own name; the client is the node itself.
    ip netns exec "$POD" "$PY" -c '
import http.server, socketserver
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"pod-smoke peer={self.client_address[0]}\n".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
socketserver.TCPServer.allow_reuse_address = True
http.server.HTTPServer(("0.0.0.0", 8080), H).serve_forever()
' &
    SERVER_PID=$!
    local _try
    for _try in $(seq 50); do
        ip netns exec "$NODE" curl -s --max-time 1 "http://$POD_IP:8080/" >/dev/null && break
        sleep 0.2
    done
    local out
    out="$(ip netns exec "$NODE" curl -s --max-time 5 "http://$VIP:80/")"
    say "curl http://$VIP:80/ -> $out"
    [[ "$out" == "pod-smoke peer="* ]]
    # The connection must be in IPVS's own table (not just any route to the pod).
    local conns
    conns="$(ip netns exec "$NODE" ipvsadm -Lnc)"
    printf '%s\n' "$conns"
    grep -Eq "$VIP:80 +$POD_IP:8080" <<<"$conns"
}

passed=0
failed=0
failures=()
t_all=$(now)
say "kernel $(uname -r), python $PY"
for check in check_a_ip_vs check_b_dummy check_c_veth check_d_pyroute2_ipvs check_e_iptables check_f_ipvs_traffic; do
    t=$(now)
    say "--- $check"
    # Run in the background and wait: keeps `set -e` active inside the check.
    "$check" &
    if wait $!; then
        passed=$((passed + 1))
        say "PASS $check ($(since "$t") s)"
    else
        failed=$((failed + 1))
        failures+=("$check")
        say "FAIL $check ($(since "$t") s)"
        # Later checks build on earlier ones (namespaces, links): stop at the first failure.
        break
    fi
done
say "total $(since "$t_all") s"
printf 'smoke: %d passed, %d failed\n' "$passed" "$failed"
if ((failed > 0)); then
    say "failed: ${failures[*]}"
    exit 1
fi
