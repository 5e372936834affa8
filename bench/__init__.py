"""The benchmark against upstream kube-proxy (not tests: scripts that print tables and write
JSON). A package run from the repository root, `python -m bench.run` / `bench.dataplane` /
`bench.cold` / `bench.decode`, so it can import the test control plane and netlab as
`tests.netlab...` without `sys.path` edits. bench/README.md has the method and the figures.
"""
