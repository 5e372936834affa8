"""Where the cluster state comes from: a state file, or the Kubernetes API."""
