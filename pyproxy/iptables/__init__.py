"""iptables mode: rendering (pure), tracing (pure) and the iptables-restore adapter (shell)."""
