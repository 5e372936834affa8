"""A full sync streamed into the real iptables-restore (legacy and nft), in throwaway namespaces.

`Iptables.restore_stream` writes the rules while they are still being rendered. These tests
check on real kernels that the result is what the one-piece document gives, that a stream
outlasting iptables-legacy-restore's lock-wait alarm still applies (with a control showing the
trap is real), that a render failing midway and a lock held by someone else leave the tables as
they were, and that a bad line is reported with its text.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from netlab.ns import call_in_netns

from pyproxy.errors import KernelError, RestoreError
from pyproxy.iptables import restore
from pyproxy.iptables.render import (
    StreamedRuleset,
    assemble_ruleset,
    is_large_cluster,
    render_service_port,
    stream_document,
)
from pyproxy.iptables.restore import Iptables
from pyproxy.iptables.restore_text import parse_ruleset
from pyproxy.iptables.vocabulary import jump_rules
from pyproxy.model import IPFamily
from pyproxy.options import parse_options, proxier_configs
from pyproxy.proxystate import count_endpoints, desired_state, port_order, service_order
from pyproxy.sources.statefile import read_objects

pytestmark = pytest.mark.kernel

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "overall.yaml"
BACKENDS = ("legacy", "nft")


@contextlib.contextmanager
def namespace() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.fail("kernel tests need root (network namespaces, iptables)")
    name = f"pyproxy-rs-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


@pytest.fixture
def ns() -> Iterator[str]:
    with namespace() as name:
        yield name


def rendered() -> tuple[list, object]:  # type: ignore[type-arg]
    """The service port rules of the `overall` golden state, and its IPv4 config."""
    from pyproxy.convert import state_from_objects

    args = [
        line.removeprefix("# args:").split()
        for line in GOLDEN.read_text().splitlines()
        if line.startswith("# args:")
    ]
    options = parse_options(["--dry-run", *[a for part in args for a in part]])
    cluster, problems = state_from_objects(read_objects(GOLDEN))
    assert not problems
    config = next(c for c in proxier_configs(options, None, ()) if c.family is IPFamily.IPv4)
    states = desired_state(cluster, config)
    large = is_large_cluster(count_endpoints(states))
    ports = [
        render_service_port(state, config, large_cluster_mode=large)
        for name in sorted(states, key=service_order)
        for state in sorted(states[name], key=port_order)
    ]
    assert len(ports) > 5
    return ports, config


def saved(ns: str, backend: str) -> dict[tuple[str, str], tuple[str, ...]]:
    """(table, chain) → rule lines, as iptables-save of `ns` shows them (chain order ignored:
    the nft variant lists chains in creation order)."""
    text = "".join(
        subprocess.run(
            ["ip", "netns", "exec", ns, f"iptables-{backend}-save", "-t", table],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        for table in ("mangle", "filter", "nat")
    )
    return {
        (table.name, chain.name): chain.lines
        for table in parse_ruleset(text).tables
        for chain in table.chains
    }


def stream(ports: list, config: object, **kw: object) -> Iterator[str]:  # type: ignore[type-arg]
    return stream_document(
        iter(ports),
        config,  # type: ignore[arg-type]
        StreamedRuleset(),
        hooks=jump_rules(config),  # type: ignore[arg-type]
        canary=True,
        **kw,  # type: ignore[arg-type]
    )


def in_ns(ns: str, fn: Callable[[], object]) -> object:
    return call_in_netns(ns, fn)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_streamed_full_sync_programs_what_the_whole_document_does(ns: str, backend: str) -> None:
    ports, config = rendered()
    ipt = Iptables(IPFamily.IPv4, backend)
    whole = assemble_ruleset(ports, config).document(  # type: ignore[arg-type]
        hooks=jump_rules(config),  # type: ignore[arg-type]
        canary=True,
    )
    with namespace() as other:
        in_ns(other, lambda: ipt.restore(whole))
        expected = saved(other, backend)
    size = in_ns(ns, lambda: ipt.restore_stream(stream(ports, config)))
    assert size == len(whole)
    got = saved(ns, backend)
    assert got == expected
    assert any(chain.startswith("KUBE-SEP-") for _, chain in got)


def slow(chunks: Iterator[str], pause: float) -> Iterator[str]:
    """The chunks, with a pause before the last one (the restore waits on its stdin)."""
    items = list(chunks)
    yield from items[:-1]
    time.sleep(pause)
    yield items[-1]


def test_a_legacy_stream_outlasting_the_lock_wait_alarm_still_applies(
    ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports, config = rendered()
    text = "".join(stream(ports, config))
    # Control: iptables-legacy-restore -w 1 reading a stream that pauses for 1.5 s gives up.
    with subprocess.Popen(
        ["ip", "netns", "exec", ns, "iptables-legacy-restore", "-w", "1", "--noflush"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as control:
        assert control.stdin is not None and control.stderr is not None
        cut = text.rindex("COMMIT")
        control.stdin.write(text[:cut].encode())
        control.stdin.flush()
        time.sleep(1.5)
        with contextlib.suppress(BrokenPipeError):
            control.stdin.write(text[cut:].encode())
            control.stdin.close()
        assert control.wait(30) != 0
        assert b"COMMIT expected" in control.stderr.read()

    # pyproxy's stream, with the same 1 s lock wait and the same pause, applies.
    monkeypatch.setattr(restore, "_WAIT_SECONDS", "1")
    ipt = Iptables(IPFamily.IPv4, "legacy")
    in_ns(ns, lambda: ipt.restore_stream(slow(stream(ports, config), 1.5)))
    assert ("nat", "KUBE-SERVICES") in saved(ns, "legacy")
    assert len(saved(ns, "legacy")[("nat", "KUBE-SERVICES")]) > 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_render_failing_midway_leaves_the_tables_as_they_were(ns: str, backend: str) -> None:
    ports, config = rendered()
    ipt = Iptables(IPFamily.IPv4, backend)
    in_ns(ns, lambda: ipt.restore_stream(stream(ports[:2], config)))
    before = saved(ns, backend)

    def failing() -> Iterator[str]:
        chunks = stream(ports, config)
        for _ in range(6):
            yield next(chunks)
        raise RuntimeError("renderer bug")

    with pytest.raises(RuntimeError, match="renderer bug"):
        in_ns(ns, lambda: ipt.restore_stream(failing()))
    assert saved(ns, backend) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bad_line_is_reported_with_its_text(ns: str, backend: str) -> None:
    ports, config = rendered()
    ipt = Iptables(IPFamily.IPv4, backend)

    def bad() -> Iterator[str]:
        chunks = list(stream(ports, config))
        yield from chunks[:3]
        yield "-A KUBE-SERVICES -m recent --name X --rcheck --seconds abc -j RETURN\n"
        yield from chunks[3:]

    with pytest.raises(RestoreError) as failure:
        in_ns(ns, lambda: ipt.restore_stream(bad()))
    assert any("--seconds abc" in line for line in failure.value.offending_lines)
    assert ("nat", "KUBE-SERVICES") not in saved(ns, backend)


def test_a_legacy_stream_waits_for_the_xtables_lock_and_gives_up_after_the_limit(
    ns: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ports, config = rendered()
    lock = tmp_path / "xtables.lock"
    monkeypatch.setenv("XTABLES_LOCKFILE", str(lock))
    monkeypatch.setattr(restore, "_WAIT_SECONDS", "1")
    ipt = Iptables(IPFamily.IPv4, "legacy")
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        started = time.monotonic()
        with pytest.raises(KernelError, match="xtables lock"):
            in_ns(ns, lambda: ipt.restore_stream(stream(ports, config)))
        assert time.monotonic() - started >= 1.0
    assert ("nat", "KUBE-SERVICES") not in saved(ns, "legacy")
    # Released: the same stream applies, and the child used the private lock file.
    in_ns(ns, lambda: ipt.restore_stream(stream(ports, config)))
    assert ("nat", "KUBE-SERVICES") in saved(ns, "legacy")
    assert Path(f"{lock}.pyproxy").exists()
