"""Every error pyproxy raises on purpose, in one place.

    PyproxyError
    ├── ConfigError            bad flags or flag combinations (exit 2)
    ├── StateFileError         an unreadable/unparsable state file (exit 1, nothing programmed)
    ├── InvalidObject          one API object with a missing/invalid field (skipped, others go on)
    ├── RulesetParseError      iptables-save/restore text the tracer cannot read (restore_text.py)
    └── KernelError            a kernel tool or netlink call failed (translated at the adapter edge)
        ├── RestoreError       iptables-restore rejected its input; carries the offending lines
        └── NftError           `nft -f` rejected a transaction; carries the offending lines

Foreign exceptions (CalledProcessError, OSError, netlink errors) are translated into these
by the adapter that called the foreign code, so callers never need to know the mechanism.
"""

from __future__ import annotations


class PyproxyError(Exception):
    """Base of every error pyproxy raises on purpose."""


class ConfigError(PyproxyError):
    """A flag or flag combination that cannot work."""


class StateFileError(PyproxyError):
    """A state file that cannot be read or parsed at all."""


class InvalidObject(PyproxyError):
    """One API object is unusable; it is skipped and every other object is still used."""

    def __init__(self, kind: str, namespace: str, name: str, field: str, reason: str) -> None:
        self.kind = kind
        self.namespace = namespace
        self.name = name
        self.field = field
        self.reason = reason
        where = f"{namespace}/{name}" if namespace else name
        super().__init__(f"{kind} {where}: field {field}: {reason}")


class KernelError(PyproxyError):
    """A kernel tool or netlink call failed."""


class RestoreError(KernelError):
    """iptables-restore rejected its input."""

    def __init__(self, message: str, offending_lines: tuple[str, ...] = ()) -> None:
        self.offending_lines = offending_lines
        super().__init__(message)


class NftError(KernelError):
    """`nft -f` rejected a transaction (nothing of it was applied: transactions are atomic)."""

    def __init__(self, message: str, offending_lines: tuple[str, ...] = ()) -> None:
        self.offending_lines = offending_lines
        super().__init__(message)
