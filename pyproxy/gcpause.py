"""Pausing CPython's cyclic garbage collector around big batches of allocations.

Both the watches (decoding a 10,000-object list) and the sync (computing and rendering every
Service) allocate many objects and free few, so the cyclic GC only walks the whole heap again
and again. It lives here, not in the watch module that first needed it, because the
controller uses it too and must not depend on the API client's plumbing for it.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator
from typing import Final


class _GcPause:
    """Pauses CPython's cyclic GC while a big list is decoded and handed over.

    Decoding allocates hundreds of thousands of containers; each few hundred trigger a young
    collection and every so often one that walks the whole heap, which roughly doubles the time
    of a 10,000-object list (bench/decode.py has the figures). The GC is process-wide, so
    overlapping pauses from the three watch threads are counted: it runs again when the last
    one ends, and only if it was on before the first began.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._was_enabled = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0 and self._was_enabled:
                    gc.enable()


gc_paused: Final = _GcPause()
"""`with gc_paused(): ...` runs the block with the cyclic GC off (nesting and threads are fine)."""
