# shellcheck shell=bash
# Common helpers for the hack/ scripts. Source it, do not run it:
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# The caller sets `set -euo pipefail`; this file only defines variables and functions.

if [[ -n "${_PYPROXY_HACK_LIB:-}" ]]; then
    return 0
fi
_PYPROXY_HACK_LIB=1

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
# Everything downloaded or built for this machine lives here, outside the repo.
PYPROXY_CACHE="${PYPROXY_CACHE:-$HOME/.cache/pyproxy}"
export REPO_ROOT VENV PYPROXY_CACHE

# log MSG...: a progress line on stderr.
log() {
    printf '[pyproxy hack] %s\n' "$*" >&2
}

# die MSG...: log the reason and exit non-zero.
die() {
    log "ERROR: $*"
    exit 1
}

# now: seconds since the epoch with microseconds (bash 5 builtin, no fork).
now() {
    printf '%s\n' "${EPOCHREALTIME/,/.}"
}

# elapsed START: seconds since START (a value of `now`), one decimal.
elapsed() {
    awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'
}

# need_root: stop with a clear reason unless running as root.
need_root() {
    [[ "$(id -u)" == 0 ]] || die "this step needs root (apt-get, modprobe, network namespaces); re-run with sudo"
}

# pkg_installed PKG: true when the Debian package PKG is installed.
pkg_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == installed ]]
}

# apt_install PKG...: install the Debian packages that are missing, quietly and
# non-interactively. `apt-get update` runs at most once per run (also across
# nested hack/ scripts, through the exported PYPROXY_APT_UPDATED).
apt_install() {
    local pkg missing=()
    for pkg in "$@"; do
        pkg_installed "$pkg" || missing+=("$pkg")
    done
    if ((${#missing[@]} == 0)); then
        log "apt: already installed: $*"
        return 0
    fi
    need_root
    export DEBIAN_FRONTEND=noninteractive
    if [[ "${PYPROXY_APT_UPDATED:-0}" != 1 ]]; then
        log "apt: apt-get update"
        apt-get update -qq
        PYPROXY_APT_UPDATED=1
        export PYPROXY_APT_UPDATED
    fi
    log "apt: installing ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    for pkg in "${missing[@]}"; do
        pkg_installed "$pkg" || die "apt: $pkg is still not installed after apt-get install"
    done
}
