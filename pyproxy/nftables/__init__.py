"""nftables mode (`--proxy-mode nftables`): kube-proxy v1.34's `kube-proxy` tables (README.md)."""
