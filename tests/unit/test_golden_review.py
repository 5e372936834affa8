"""Every golden file's review is bound to its content through tests/golden/REVIEWED.

The `## Reviewed` notes at the top of a `.rules` file survive an `UPDATE_GOLDEN=1` rewrite, and
the explain JSON goldens and kernel captures (`explain/*.save`) carry no notes at all; so the
review is recorded as the sha256 of each golden file's bytes in tests/golden/REVIEWED
(`sha256sum` format). A regenerated golden fails here until a person has reviewed it and run
`hack/review_golden.py FILE` (see that script).
"""

from __future__ import annotations

import hashlib

from support import GOLDEN_DIR

MANIFEST = GOLDEN_DIR / "REVIEWED"
#: The expected outputs checked by tests/unit/test_golden.py, tests/unit/test_explain.py and
#: tests/kernel/test_trace_drift.py (the state inputs, *.yaml, are not outputs).
PATTERNS = (
    "*.rules",
    "*.txt",
    "explain/*.json",
    "explain/*.save",
    "nftables/*.nft",
    "nftables/*.txt",
)


def _recorded() -> dict[str, str]:
    entries: dict[str, str] = {}
    for line in MANIFEST.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        sha, sep, name = line.partition("  ")
        assert sep and len(sha) == 64, f"REVIEWED: not a sha256sum line: {line!r}"
        assert name not in entries, f"REVIEWED lists {name} twice"
        entries[name] = sha
    return entries


def _golden_files() -> set[str]:
    return {p.relative_to(GOLDEN_DIR).as_posix() for pat in PATTERNS for p in GOLDEN_DIR.glob(pat)}


def test_the_manifest_lists_exactly_the_golden_files() -> None:
    files = _golden_files()
    recorded = set(_recorded())
    assert {n.split("/")[0] for n in files if "/" in n} == {"explain", "nftables"}
    assert any(n.endswith(".save") for n in files), "kernel captures are golden files too"
    assert sorted(files - recorded) == [], "golden files never reviewed (hack/review_golden.py)"
    assert sorted(recorded - files) == [], "REVIEWED lists files that do not exist"


def test_every_golden_file_is_the_reviewed_content() -> None:
    recorded = _recorded()
    changed = [
        name
        for name in sorted(_golden_files() & set(recorded))
        if hashlib.sha256((GOLDEN_DIR / name).read_bytes()).hexdigest() != recorded[name]
    ]
    assert changed == [], (
        "changed since their review (an UPDATE_GOLDEN rewrite or a hand edit): review the diff"
        " against the reference, then record it with .venv/bin/python hack/review_golden.py "
        + " ".join(f"tests/golden/{n}" for n in changed)
    )
