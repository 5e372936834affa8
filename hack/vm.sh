#!/usr/bin/env bash
# The IPVS test VM: a stock Debian kernel (which has ip_vs and dummy, unlike the host's)
# booted with virtme-ng, sharing the host filesystem.
#
#   hack/vm.sh setup             install linux-image-amd64, qemu-system-x86 (Debian),
#                                virtme-ng (PyPI, into $PYPROXY_CACHE/vng-venv) and, when cargo
#                                is there, virtiofsd (crates.io, built into
#                                $PYPROXY_CACHE/virtiofsd); idempotent
#   hack/vm.sh run -- CMD...     boot the VM, load the IPVS/conntrack/dummy modules, run CMD
#                                as root in the repo dir, exit with CMD's exit code
#   hack/vm.sh info              print what `run` would use (kernel, KVM, file sharing, vng)
#
# The guest sees the host's root filesystem read-only with a throwaway overlay on /etc, /usr,
# /var, /tmp, ... (vng's default: guest writes vanish), except the repo dir ($REPO_ROOT,
# including .venv) and a per-run dir in $PYPROXY_CACHE/vm-runs, which are shared read-write
# so results reach the host. The host files are shared through virtiofs when virtiofsd is
# available (Python imports about 3x faster than over 9p), else 9p.
#
# Environment:
#   PYPROXY_VM_KERNEL        kernel image (default: newest /boot/vmlinuz-* with its /lib/modules)
#   PYPROXY_VM_MEMORY        guest memory (default 2G)
#   PYPROXY_VM_CPUS          guest CPUs (default: host cores)
#   PYPROXY_VM_KVM           auto (default: use /dev/kvm when a probe boot works), 0 (never),
#                            1 (required)
#   PYPROXY_VM_FS            auto (default: virtiofs when virtiofsd is built, else 9p) or 9p
#   PYPROXY_VM_BOOT_TIMEOUT  seconds until the guest must reach CMD (default 300)
#   PYPROXY_VM_TIMEOUT       seconds for the whole run, boot included (default 3600)
#   PYPROXY_VM_VERBOSE=1     show the guest kernel's console (boot messages) on stderr
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

VNG_VERSION="${PYPROXY_VNG_VERSION:-1.42}"
VNG_VENV="$PYPROXY_CACHE/vng-venv"
VNG="$VNG_VENV/bin/vng"
VIRTIOFSD_VERSION="${PYPROXY_VIRTIOFSD_VERSION:-1.14.0}"
VIRTIOFSD_ROOT="$PYPROXY_CACHE/virtiofsd"
VIRTIOFSD="$VIRTIOFSD_ROOT/bin/virtiofsd"
VM_DEBIAN_PACKAGES=(
    linux-image-amd64 # Debian's stock kernel, modules in /lib/modules/<ver>
    qemu-system-x86
    busybox-static # virtme-ng's initramfs and guest helpers
    kmod           # modprobe inside the guest
    iproute2
    file
    util-linux-extra
    ipvsadm
)
# Build dependencies of virtiofsd (crates.io); Debian bookworm does not package virtiofsd.
VIRTIOFSD_BUILD_PACKAGES=(libseccomp-dev libcap-ng-dev pkg-config gcc)
# Modules loaded in the guest before CMD; the ones the kernel lacks are reported, not fatal.
VM_MODULES=(ip_vs ip_vs_rr ip_vs_wrr ip_vs_sh ip_vs_lc ip_vs_wlc nf_conntrack nf_nat dummy veth
    nf_tables ip_tables iptable_nat iptable_filter xt_conntrack xt_MASQUERADE)

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
    exit 2
}

# --- setup ------------------------------------------------------------------------------
find_cargo() {
    if command -v cargo >/dev/null; then
        command -v cargo
    elif [[ -x "$HOME/.cargo/bin/cargo" ]]; then
        printf '%s\n' "$HOME/.cargo/bin/cargo"
    else
        return 1
    fi
}

cmd_setup() {
    local t cargo
    t=$(now)
    log "vm setup 1/3: Debian packages: ${VM_DEBIAN_PACKAGES[*]}"
    apt_install "${VM_DEBIAN_PACKAGES[@]}"
    log "vm setup 1/3: done in $(elapsed "$t") s"

    t=$(now)
    log "vm setup 2/3: virtme-ng $VNG_VERSION from PyPI into $VNG_VENV"
    if [[ -x "$VNG" ]] && [[ "$("$VNG" --version 2>&1)" == "virtme-ng $VNG_VERSION" ]]; then
        log "vm setup 2/3: already installed: $("$VNG" --version 2>&1)"
    else
        mkdir -p "$PYPROXY_CACHE"
        rm -rf "$VNG_VENV"
        # Debian's own python3 keeps venv/ensurepip in python3-venv.
        python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv
        python3 -m venv "$VNG_VENV"
        "$VNG_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "virtme-ng==$VNG_VERSION"
        log "vm setup 2/3: installed $("$VNG" --version 2>&1) in $(elapsed "$t") s"
    fi

    t=$(now)
    log "vm setup 3/3: virtiofsd $VIRTIOFSD_VERSION from crates.io into $VIRTIOFSD_ROOT (faster file sharing than 9p)"
    if [[ -x "$VIRTIOFSD" ]] && [[ "$("$VIRTIOFSD" --version 2>&1)" == "virtiofsd $VIRTIOFSD_VERSION" ]]; then
        log "vm setup 3/3: already built: $("$VIRTIOFSD" --version 2>&1)"
    elif cargo="$(find_cargo)"; then
        apt_install "${VIRTIOFSD_BUILD_PACKAGES[@]}"
        log "vm setup 3/3: cargo install virtiofsd@$VIRTIOFSD_VERSION (a few minutes on 2 cores)"
        if "$cargo" install --quiet --locked --force --root "$VIRTIOFSD_ROOT" "virtiofsd@$VIRTIOFSD_VERSION"; then
            log "vm setup 3/3: built $("$VIRTIOFSD" --version 2>&1) in $(elapsed "$t") s"
        else
            rm -f "$VIRTIOFSD"
            log "vm setup 3/3: WARNING: building virtiofsd failed after $(elapsed "$t") s; the VM will share files over 9p (works, slower)"
        fi
    else
        log "vm setup 3/3: WARNING: no cargo on this machine; the VM will share files over 9p (works, but Python imports are ~3x slower)"
    fi
    cmd_info
}

# fs_mode: "virtiofs" or "9p" according to PYPROXY_VM_FS and what is installed.
fs_mode() {
    case "${PYPROXY_VM_FS:-auto}" in
    9p) echo 9p ;;
    auto) if [[ -x "$VIRTIOFSD" ]]; then echo virtiofs; else echo 9p; fi ;;
    *) die "PYPROXY_VM_FS must be auto or 9p" ;;
    esac
}

# --- helpers for run ----------------------------------------------------------------------

# pick_kernel: the kernel image to boot; its modules must be in /lib/modules/<ver>.
pick_kernel() {
    local k ver best=""
    if [[ -n "${PYPROXY_VM_KERNEL:-}" ]]; then
        [[ -r "$PYPROXY_VM_KERNEL" ]] || die "PYPROXY_VM_KERNEL=$PYPROXY_VM_KERNEL is not a readable file"
        printf '%s\n' "$PYPROXY_VM_KERNEL"
        return 0
    fi
    # The highest version by version sort (6.1.0-10 > 6.1.0-9); skip images without modules.
    best="$(for k in /boot/vmlinuz-*; do
        ver="${k#/boot/vmlinuz-}"
        if [[ -e "$k" && -f "/lib/modules/$ver/modules.dep" ]]; then printf '%s\n' "$k"; fi
    done | sort -V | tail -n1)"
    [[ -n "$best" ]] || die "no /boot/vmlinuz-* with matching /lib/modules/<ver>/modules.dep; run: hack/vm.sh setup"
    printf '%s\n' "$best"
}

# kvm_usable KERNEL: true when KVM can really boot KERNEL. /dev/kvm being there is not enough:
# under nested virtualisation QEMU may abort (e.g. "failed to set MSR 0x10a") or the guest may
# hang. The probe boots KERNEL without a root fs (it panics at once, ~1 s with working KVM)
# and is cached per host boot and kernel in $PYPROXY_CACHE.
kvm_usable() {
    local kernel="$1" cache out verdict
    [[ -r /dev/kvm && -w /dev/kvm ]] || return 1
    command -v qemu-system-x86_64 >/dev/null || return 1
    cache="$PYPROXY_CACHE/kvm-probe.$(cat /proc/sys/kernel/random/boot_id).$(basename "$kernel")"
    if [[ -f "$cache" ]]; then
        [[ "$(cat "$cache")" == on ]]
        return
    fi
    log "vm: probing KVM with $kernel (up to 30 s; cached in $cache)"
    out="$(timeout 30 qemu-system-x86_64 -machine accel=kvm -cpu host -m 256 -nodefaults \
        -display none -serial stdio -no-reboot -kernel "$kernel" \
        -append 'console=ttyS0 panic=-1 root=/dev/pyproxy-kvm-probe' </dev/null 2>&1 || true)"
    if grep -q 'Kernel panic' <<<"$out"; then verdict=on; else verdict=off; fi
    if [[ "$verdict" == off ]]; then
        log "vm: KVM probe failed, using TCG (slow); QEMU said: $(grep -a -m1 -i -E 'error|assert' <<<"$out" || echo 'no kernel output within 30 s')"
    fi
    mkdir -p "$PYPROXY_CACHE"
    printf '%s\n' "$verdict" >"$cache"
    [[ "$verdict" == on ]]
}

kvm_desc() {
    stat -c '%A %U:%G' /dev/kvm 2>/dev/null || echo missing
}

# kvm_mode KERNEL: "on" or "off" according to PYPROXY_VM_KVM and the probe.
kvm_mode() {
    case "${PYPROXY_VM_KVM:-auto}" in
    0 | no | off) echo off ;;
    1 | yes | on)
        kvm_usable "$1" || die "PYPROXY_VM_KVM=1 but KVM cannot boot $1 (/dev/kvm: $(kvm_desc))"
        echo on
        ;;
    auto) if kvm_usable "$1"; then echo on; else echo off; fi ;;
    *) die "PYPROXY_VM_KVM must be auto, 0 or 1" ;;
    esac
}

cmd_info() {
    local kernel
    [[ -x "$VNG" ]] || die "virtme-ng is not installed at $VNG; run: hack/vm.sh setup"
    kernel="$(pick_kernel)"
    log "vm: vng $("$VNG" --version 2>&1) at $VNG"
    log "vm: kernel $kernel, modules /lib/modules/${kernel#/boot/vmlinuz-}"
    log "vm: qemu $(qemu-system-x86_64 --version | head -n1)"
    log "vm: KVM $(kvm_mode "$kernel") (/dev/kvm: $(kvm_desc))"
    log "vm: file sharing $(fs_mode)$([[ -x "$VIRTIOFSD" ]] && echo " ($("$VIRTIOFSD" --version 2>&1) at $VIRTIOFSD)")"
}

# --- run --------------------------------------------------------------------------------
cmd_run() {
    [[ "${1:-}" == -- ]] && shift
    (($# > 0)) || die "usage: hack/vm.sh run -- CMD [ARGS...]"
    need_root
    # QEMU re-opens /proc/self/fd/1 and /proc/self/fd/2 (truncating, with offsets of its own):
    # when they are regular files (`hack/vm.sh run ... >log 2>&1`) the guest's output and ours
    # overwrite each other. Pipes do not have that problem, so go through them.
    if [[ -z "${_PYPROXY_VM_PIPED:-}" ]] && [[ -f /dev/stdout || -f /dev/stderr ]]; then
        local rc=0
        _PYPROXY_VM_PIPED=1 bash "${BASH_SOURCE[0]}" run -- "$@" 2> >(cat >&2) | cat || rc=$?
        return "$rc"
    fi
    [[ -x "$VNG" ]] || die "virtme-ng is not installed at $VNG; run: hack/vm.sh setup"
    command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found; run: hack/vm.sh setup"

    local kernel kvm fs memory cpus boot_timeout total_timeout rundir guestcmd
    kernel="$(pick_kernel)"
    kvm="$(kvm_mode "$kernel")"
    fs="$(fs_mode)"
    memory="${PYPROXY_VM_MEMORY:-2G}"
    cpus="${PYPROXY_VM_CPUS:-$(nproc)}"
    boot_timeout="${PYPROXY_VM_BOOT_TIMEOUT:-300}"
    total_timeout="${PYPROXY_VM_TIMEOUT:-3600}"

    mkdir -p "$PYPROXY_CACHE/vm-runs"
    rundir="$(mktemp -d "$PYPROXY_CACHE/vm-runs/run.XXXXXX")"
    # The guest writes: started (its uptime when CMD begins), modules (what loaded), rc.
    guestcmd="$(printf '%q ' bash "$REPO_ROOT/hack/vm.sh" guest "$rundir" -- "$@")"

    local vng_args=(--run "$kernel" --user root --memory "$memory" --cpus "$cpus"
        --rwdir "$REPO_ROOT" --rwdir "$rundir" --cwd "$REPO_ROOT" --exec "$guestcmd")
    [[ "$kvm" == on ]] || vng_args+=(--disable-kvm)
    [[ "$fs" == virtiofs ]] || vng_args+=(--force-9p)
    [[ "${PYPROXY_VM_VERBOSE:-0}" == 1 ]] && vng_args+=(--verbose)

    log "vm: booting $kernel (KVM $kvm, $fs, memory $memory, cpus $cpus, boot timeout ${boot_timeout}s)"
    log "vm: CMD: $*"
    local t0 pid rc=0 booted="" boot_s="" state=running
    t0=$(now)
    # Own process group, so a timeout can end vng and its QEMU together (and nothing else).
    # vng runs its helpers (virtme-run, ...) and virtiofsd from PATH: put ours first.
    PATH="$VIRTIOFSD_ROOT/bin:$VNG_VENV/bin:$PATH" setsid "$VNG" "${vng_args[@]}" </dev/null &
    pid=$!
    # shellcheck disable=SC2064
    trap "kill -TERM -- -$pid 2>/dev/null || true; rm -rf '$rundir'" EXIT

    while kill -0 "$pid" 2>/dev/null; do
        if [[ -z "$booted" && -f "$rundir/started" ]]; then
            booted=1
            boot_s="$(elapsed "$t0")"
            log "vm: guest up after ${boot_s} s (guest kernel uptime $(cut -d' ' -f1 "$rundir/started") s); running CMD"
        fi
        if [[ -z "$booted" ]] && awk -v e="$(elapsed "$t0")" -v m="$boot_timeout" 'BEGIN { exit !(e > m) }'; then
            state=boot-timeout
            break
        fi
        if awk -v e="$(elapsed "$t0")" -v m="$total_timeout" 'BEGIN { exit !(e > m) }'; then
            state=timeout
            break
        fi
        sleep 0.2
    done
    if [[ "$state" != running ]]; then
        kill -TERM -- "-$pid" 2>/dev/null || true
        sleep 2
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    wait "$pid" || rc=$?
    local total_s
    total_s="$(elapsed "$t0")"

    case "$state" in
    boot-timeout) die "VM did not boot: the guest did not reach CMD within ${boot_timeout}s (KVM $kvm); re-run with PYPROXY_VM_VERBOSE=1 to see the kernel console, or raise PYPROXY_VM_BOOT_TIMEOUT" ;;
    timeout) die "VM run timed out after ${total_timeout}s (PYPROXY_VM_TIMEOUT); CMD was still running" ;;
    esac
    if [[ ! -f "$rundir/started" ]]; then
        die "VM did not boot: vng exited with $rc after ${total_s}s before the guest ran CMD; re-run with PYPROXY_VM_VERBOSE=1 to see the kernel console"
    fi
    if [[ ! -f "$rundir/rc" ]]; then
        die "VM stopped while CMD was running (vng exit $rc after ${total_s}s): kernel panic, out of memory or QEMU crash? re-run with PYPROXY_VM_VERBOSE=1"
    fi
    local cmd_rc
    cmd_rc="$(cat "$rundir/rc")"
    [[ "$cmd_rc" =~ ^[0-9]+$ ]] || die "guest wrote an invalid exit code: '$cmd_rc'"
    if [[ -n "$boot_s" ]]; then
        log "vm: boot ${boot_s} s, total ${total_s} s, CMD exit code $cmd_rc"
    else
        log "vm: total ${total_s} s, CMD exit code $cmd_rc"
    fi
    return "$cmd_rc"
}

# --- inside the guest ---------------------------------------------------------------------
# hack/vm.sh guest RUNDIR -- CMD...: runs inside the VM (vng --exec); not for direct use.
cmd_guest() {
    local rundir="$1"
    shift
    [[ "${1:-}" == -- ]] && shift
    [[ -d "$rundir" ]] || die "guest: run dir $rundir is not shared into the guest"
    export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"
    export HOME=/root PYPROXY_IN_VM=1
    # vng carries the guest's stdout and stderr on two separate ports, which interleaves
    # them badly on the host; one stream keeps the order of what CMD printed.
    exec 2>&1
    cut -d' ' -f1 /proc/uptime >"$rundir/started.tmp"
    mv "$rundir/started.tmp" "$rundir/started"
    local m t loaded=() missing=()
    t=$(now)
    for m in "${VM_MODULES[@]}"; do
        if modprobe "$m" 2>/dev/null; then loaded+=("$m"); else missing+=("$m"); fi
    done
    log "guest: kernel $(uname -r), modules loaded in $(elapsed "$t") s: ${loaded[*]:-none}"
    ((${#missing[@]} == 0)) || log "guest: modules NOT available: ${missing[*]}"
    printf '%s\n' "${loaded[@]}" >"$rundir/modules"
    cd "$REPO_ROOT"
    local rc=0
    "$@" || rc=$?
    printf '%s\n' "$rc" >"$rundir/rc.tmp"
    mv "$rundir/rc.tmp" "$rundir/rc"
    sync
    return "$rc"
}

case "${1:-}" in
setup) cmd_setup ;;
info) cmd_info ;;
run)
    shift
    cmd_run "$@"
    ;;
guest)
    shift
    cmd_guest "$@"
    ;;
-h | --help | help | "") usage ;;
*) die "unknown command '$1' (setup, run, info)" ;;
esac
