#!/usr/bin/python3
"""runc wrapper that drops the capabilities the sandbox's bounding set lacks.

Some sandboxes run everything with a capability bounding set that lacks a
capability (on the machine this was written for: CAP_SYS_RESOURCE). runc then
fails every `docker run --privileged` (kind's nodes are privileged containers)
with "unable to apply caps: operation not permitted", because a privileged
container asks for every capability and docker 20.10 ignores --cap-drop
together with --privileged. hack/kind-offline.sh registers this file as the
default runtime of its own dockerd, and only when /proc/self/status's CapBnd
lacks a capability.

What it does: for `runc ... create|run --bundle DIR` it removes, from every
capability set in DIR/config.json, the capabilities absent from CapBnd; for
`runc ... exec --process FILE` it does the same to FILE. Then it execs the real
runc with the unchanged arguments. Capabilities a process cannot have anyway
are all it removes, so the container gets exactly what the sandbox allows.

Standard library only: it runs under the host's /usr/bin/python3 for every
container start, outside any virtualenv.
"""

import json
import os
import sys

REAL_RUNC = os.environ.get("PYPROXY_REAL_RUNC", "/usr/bin/runc")

# linux/capability.h numbering; runc's config.json uses these names.
CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)


def bounding_set() -> set[str]:
    """The capability names present in this process's bounding set."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("CapBnd:"):
                mask = int(line.split()[1], 16)
                return {name for bit, name in enumerate(CAPABILITIES) if mask >> bit & 1}
    raise SystemExit("runc-capbnd: no CapBnd line in /proc/self/status")


def filter_capabilities(capabilities: dict[str, list[str]], allowed: set[str]) -> bool:
    """Remove what `allowed` lacks from every set; True when something changed."""
    changed = False
    for name, values in capabilities.items():
        kept = [value for value in values if value in allowed]
        if kept != values:
            capabilities[name] = kept
            changed = True
    return changed


def rewrite(path: str, allowed: set[str], *, process_file: bool) -> None:
    """Filter the capabilities of a bundle's config.json or of an exec process file."""
    with open(path, encoding="utf-8") as f:
        document = json.load(f)
    process = document if process_file else document.get("process", {})
    capabilities = process.get("capabilities")
    if capabilities and filter_capabilities(capabilities, allowed):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(document, f)


def option_value(args: list[str], long: str, short: str) -> str | None:
    """The value of `--long X`, `--long=X` or `-short X` in args, if present."""
    for i, arg in enumerate(args):
        if arg in (long, short) and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(long + "="):
            return arg.split("=", 1)[1]
    return None


def main() -> None:
    args = sys.argv[1:]
    allowed = bounding_set()
    if "create" in args or "run" in args:
        bundle = option_value(args, "--bundle", "-b")
        if bundle is not None:
            rewrite(os.path.join(bundle, "config.json"), allowed, process_file=False)
    if "exec" in args:
        process = option_value(args, "--process", "-p")
        if process is not None:
            rewrite(process, allowed, process_file=True)
    # S606: exec'ing the real runc with the caller's arguments is this wrapper's job.
    os.execv(REAL_RUNC, [REAL_RUNC, *args])  # noqa: S606


if __name__ == "__main__":
    main()
