#!/usr/bin/env bash
# The whole test suite on a fresh machine (what CI runs): setup, static checks, then every tier.
#
#   hack/test.sh [extra pytest args...]
#
# 1. hack/setup.sh: Debian packages and the venv.
# 2. hack/build-control-plane.sh: kube-apiserver, kube-controller-manager, kube-proxy and etcd,
#    built once per machine from the Go module proxy, cached outside the repo.
# 3. hack/vm.sh setup: the Debian kernel with ip_vs, qemu and virtme-ng for the IPVS tests.
# 4. Static checks: ruff (lint and format), mypy (strict), import-linter (pure core, layers,
#    independent modes, no cycles), shellcheck.
# 5. pytest: unit, kernel (root, real iptables in network namespaces), integration (real
#    apiserver + etcd), then the vm tier inside the VM. Nothing is skipped: a missing
#    prerequisite is a failure.
# 6. kind tier: hack/kind-up.sh (a real 3-node kind cluster, kubeProxyMode none, pyproxy's
#    DaemonSet in iptables mode; with no registry it builds every image locally, cached),
#    hack/e2e-kind.sh (traffic checks from real pods), upstream's [sig-network] Services
#    [Conformance] e2e specs (hack/upstream-e2e.sh, e2e.test built from Go modules), then
#    hack/kind-down.sh, also when a step fails. IPVS mode stays in the vm tier: the host
#    kernel has no IP_VS.
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need_root
cd "$REPO_ROOT"
start=$(now)

log "== setup"
hack/setup.sh
# The kind tier's debootstrap waits on the network more than on the CPU: on a cold
# cache it runs in the background while the control plane compiles.
# debootstrap is installed first, here: a background apt-get would race hack/vm.sh's.
apt_install debootstrap
mkdir -p "$PYPROXY_CACHE"
hack/kind-offline.sh fetch >"$PYPROXY_CACHE/kind-fetch.log" 2>&1 &
kind_fetch_pid=$!
log "== control plane (cached after the first build)"
hack/build-control-plane.sh
log "== IPVS test VM (cached after the first setup)"
hack/vm.sh setup

log "== static checks"
"$VENV/bin/ruff" check pyproxy tests hack bench
"$VENV/bin/ruff" format --check pyproxy tests hack bench
"$VENV/bin/python" -m mypy
"$VENV/bin/lint-imports"
shellcheck -x hack/*.sh .ci/run

log "== pytest: unit, kernel, integration"
"$VENV/bin/python" -m pytest -m "not vm" -p no:cacheprovider "$@"

log "== pytest: vm tier (IPVS) inside the VM"
hack/vm.sh run -- "$VENV/bin/python" -m pytest tests/vm -m vm -p no:cacheprovider "$@"

log "== kind tier: pyproxy as the DaemonSet of a real kind cluster"
wait "$kind_fetch_pid" || die "the kind tier's debootstrap failed: $(tail -5 "$PYPROXY_CACHE/kind-fetch.log")"
t=$(now)
# The kind tier starts its own engine; it must be gone afterwards whatever happened.
trap 'hack/kind-down.sh || log "kind-down failed: clean up with hack/kind-down.sh"' EXIT
hack/kind-up.sh
log "kind-up done in $(elapsed "$t") s"
t=$(now)
hack/e2e-kind.sh
log "e2e-kind done in $(elapsed "$t") s"
t=$(now)
# Upstream's own [sig-network] Services [Conformance] specs against pyproxy (the
# kube-proxy control run and the full focus are documented commands, not CI).
PROXIES=pyproxy SUMMARY="$REPO_ROOT/_artifacts/upstream-e2e/summary.md" hack/upstream-e2e.sh
log "upstream e2e (Conformance) done in $(elapsed "$t") s"
hack/kind-down.sh
trap - EXIT

log "all tests passed in $(elapsed "$start") s"
