"""pyproxy: kube-proxy reimplemented in Python.

The pure core turns cluster state into the rules a node needs and never imports the shell (the
modules that read state and talk to the kernel: cli, sources, the proxiers, the kernel adapters,
hostnet, log). The list below is the one README.md ("How it is built") and the "pure core"
import-linter contract in pyproject.toml give; tests/unit/test_architecture.py checks that the
three agree.

Pure core: `model`, `errors`, `serviceport`, `convert`, `changes`, `policy`, `proxystate`,
`proxier`, `conntrack_plan`, `iptables.vocabulary`, `iptables.kernelview`, `iptables.render`,
`iptables.restore_text`, `iptables.tracer`, `iptables.drift`, `ipvs.plan`, `ipvs.diff`,
`ipvs.rules`, `ipvs.ipsets`, `nftables.render`, `explain.report`, `explain.endpoints`,
`explain.connections`, `explain.diagnoses`, `explain.service`, `explain.packet`,
`explain.format`.
"""

__version__ = "0.1.0"
