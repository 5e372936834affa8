"""pytest fixtures for netlab. In a conftest.py (with tests/ on sys.path):

    from netlab.fixtures import cluster, cluster_fixture   # noqa: F401  (default "cluster")
    big = cluster_fixture({"a": ("a1", "a2", "a3"), "b": ("b1",)}, clients=("c1", "c2"))
    shared = cluster_fixture(scope="module")               # one cluster for a whole module

Without root the fixture FAILS the test (kernel tests are never skipped silently).
NETLAB_KEEP_LOGS=1 keeps the per-cluster log directory (backend/proxy output) for debugging.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import pytest

from .cluster import Cluster, Serve


def cluster_fixture(
    layout: Mapping[str, Sequence[str]] | None = None,
    *,
    scope: Literal["session", "package", "module", "class", "function"] = "function",
    clients: Sequence[str] = ("client",),
    serve: Serve | None = Serve(),  # noqa: B008 - frozen dataclass
    **kwargs: Any,
) -> Callable[..., Any]:
    """Make a fixture that yields an up `Cluster` and always tears it down."""

    @pytest.fixture(scope=scope)
    def _cluster() -> Iterator[Cluster]:
        if os.geteuid() != 0:
            pytest.fail("kernel tests need root (network namespaces); run them as root")
        keep = os.environ.get("NETLAB_KEEP_LOGS", "") not in ("", "0")
        c = Cluster(layout, clients=clients, serve=serve, keep_logs=keep, **kwargs)
        with c:
            yield c

    return _cluster


cluster = cluster_fixture()
