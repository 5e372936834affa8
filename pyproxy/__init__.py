"""pyproxy: kube-proxy reimplemented in Python.

The pure core (model, convert, serviceport, policy, proxystate, iptables.render,
iptables.tracer) turns cluster state into the rules a node needs; the shell (cli, sources,
iptables.restore, iptables.proxier, hostnet, log) reads state and talks to the kernel.
"""

__version__ = "0.1.0"
