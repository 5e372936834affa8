#!/usr/bin/env bash
# Fresh-machine setup for pyproxy development and tests (idempotent; a second run is fast).
#
#   hack/setup.sh
#
# 1. Debian packages the kernel and integration tests use (iptables legacy+nft, nft,
#    conntrack, ipset, ipvsadm, iproute2, curl, socat, ...).
# 2. The project venv at $REPO_ROOT/.venv with `pip install -e '.[test]'`; skipped when
#    pyproject.toml and the interpreter are unchanged since the last successful install.
#
# Environment: PYTHON (interpreter for the venv, default python3, must be >= 3.11),
#              PYPROXY_CACHE (default ~/.cache/pyproxy; nothing is cached inside the repo).
# The IPVS test VM is set up separately: hack/vm.sh setup.
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DEBIAN_PACKAGES=(
    iptables       # iptables-nft and iptables-legacy (+ -save/-restore)
    nftables       # nft
    conntrack      # conntrack -L/-D
    ipset
    ipvsadm
    iproute2       # ip netns, veth, ss
    kmod           # modprobe, lsmod
    procps         # sysctl, pgrep
    iputils-ping
    curl           # client "pods" in kernel/integration tests
    socat
    openssl        # test certificates for the apiserver
    ca-certificates
    shellcheck     # lint for hack/ scripts
    git
)

start_all=$(now)

# --- Debian packages -------------------------------------------------------------------
t=$(now)
log "step 1/3: Debian packages: ${DEBIAN_PACKAGES[*]}"
apt_install "${DEBIAN_PACKAGES[@]}"
log "step 1/3: done in $(elapsed "$t") s"

# Both iptables variants must be usable; Debian's default alternative is the nft one.
for tool in iptables-nft iptables-legacy iptables-nft-restore iptables-legacy-restore; do
    command -v "$tool" >/dev/null || die "$tool not found after installing iptables"
done
log "iptables default: $(readlink -f "$(command -v iptables)") ($(iptables --version 2>&1))"

# kubectl is not installed by this script: Debian bookworm only has `kubernetes-client`
# 1.20 (far older than the apiserver the tests build), and no other source is allowed.
if command -v kubectl >/dev/null; then
    log "kubectl: found $(command -v kubectl) ($(kubectl version --client 2>/dev/null | head -n1 || echo 'version unknown'))"
else
    log "kubectl: not installed (optional; Debian bookworm only packages kubernetes-client 1.20, too old)"
fi

# --- project venv ----------------------------------------------------------------------
t=$(now)
PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null || die "no $PYTHON on PATH; install Python >= 3.11 (pyenv or Debian python3)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is $("$PYTHON" --version 2>&1); pyproxy needs Python >= 3.11"
py_real="$("$PYTHON" -c 'import sys; print(sys.executable)')"
py_version="$("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
    # Debian's own python3 splits venv/ensurepip into python3-venv.
    apt_install python3-venv
fi

log "step 2/3: venv at $VENV with $py_real ($py_version)"
if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    log "step 2/3: venv exists ($("$VENV/bin/python" --version 2>&1)), kept"
else
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    log "step 2/3: venv created in $(elapsed "$t") s"
fi

# --- pip install -e '.[test]' ----------------------------------------------------------
t=$(now)
stamp="$VENV/.pyproxy-setup.stamp"
want="$( (sha256sum "$REPO_ROOT/pyproject.toml" | cut -d' ' -f1; "$VENV/bin/python" --version) | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$VENV/bin/python" -c 'import pyproxy' 2>/dev/null; then
    log "step 3/3: pip install skipped: pyproject.toml unchanged since the last install (stamp $stamp)"
else
    rm -f "$stamp"
    log "step 3/3: pip install -e '.[test]' (pip cache: ${PIP_CACHE_DIR:-$HOME/.cache/pip})"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    (cd "$REPO_ROOT" && "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[test]')
    printf '%s\n' "$want" >"$stamp"
    log "step 3/3: pip install done in $(elapsed "$t") s"
fi

log "setup done in $(elapsed "$start_all") s: venv $VENV ($("$VENV/bin/python" --version 2>&1)); activate with: source .venv/bin/activate"
log "next: hack/vm.sh setup (IPVS test kernel), then hack/vm.sh run -- .venv/bin/python -m pytest tests/vm -m vm -q"
