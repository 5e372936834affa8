"""kube-proxy's IPVS mode: virtual servers, the kube-ipvs0 dummy interface, ipsets, iptables.

Pure core (no I/O; unit-tested without a kernel):

- `ipsets`: the ipset names, types and member strings ipvs mode uses, `ipset restore` text.
- `rules`: the iptables-restore input ipvs mode still needs (masquerade, NodePort and
  externalTrafficPolicy Local handling, loadBalancerSourceRanges, the KUBE-IPVS-FILTER guard).
- `plan`: ServicePortStates + ProxierConfig → the desired virtual servers, real servers,
  addresses to bind, ipset members and rules (`plan_ipvs`), and the `--dry-run` text.
- `diff`: kernel state vs plan → an ordered list of operations, graceful termination included.

Shell:

- `kernel`: the one adapter to the kernel (pyroute2 IPVS and IPRoute, the `ipset` binary).
- `proxier`: `IpvsProxier` (read → plan → diff → apply, one family), `cleanup`.

See README.md in this directory for the layout and the differences from kube-proxy.
"""
