"""Record that golden files were reviewed by hand: their sha256 goes into tests/golden/REVIEWED.

A golden file is only worth something if a person checked it against the reference. The review
is bound to the content: tests/unit/test_golden_review.py fails for any golden file whose bytes
differ from the sha256 recorded here, so a file rewritten by `UPDATE_GOLDEN=1` (rules, explain
JSON, kernel captures) fails the unit tier until someone reviews the diff and records it:

    .venv/bin/python hack/review_golden.py              # list what is new or changed
    .venv/bin/python hack/review_golden.py FILE...      # after reviewing: record these files

REVIEWED is `sha256sum` output (two spaces, path relative to tests/golden), so
`cd tests/golden && sha256sum --check --quiet REVIEWED` checks it without Python too.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "tests" / "golden"
MANIFEST = GOLDEN_DIR / "REVIEWED"
#: Expected outputs (the inputs, *.yaml, are what a test feeds in, not what it checks).
PATTERNS = (
    "*.rules",
    "*.txt",
    "explain/*.json",
    "explain/*.save",
    "nftables/*.nft",
    "nftables/*.txt",
)


def golden_files() -> list[str]:
    return sorted(
        p.relative_to(GOLDEN_DIR).as_posix()
        for pattern in PATTERNS
        for p in GOLDEN_DIR.glob(pattern)
    )


def digest(name: str) -> str:
    return hashlib.sha256((GOLDEN_DIR / name).read_bytes()).hexdigest()


def read_manifest() -> dict[str, str]:
    recorded: dict[str, str] = {}
    if not MANIFEST.exists():
        return recorded
    for line in MANIFEST.read_text().splitlines():
        if line and not line.startswith("#"):
            sha, _, name = line.partition("  ")
            recorded[name] = sha
    return recorded


def write_manifest(recorded: dict[str, str]) -> None:
    MANIFEST.write_text("".join(f"{sha}  {name}\n" for name, sha in sorted(recorded.items())))


def unreviewed() -> list[str]:
    recorded = read_manifest()
    return [name for name in golden_files() if recorded.get(name) != digest(name)]


def main(argv: list[str]) -> int:
    if not argv:
        pending = unreviewed()
        for name in pending:
            print(f"unreviewed: tests/golden/{name}")
        return 1 if pending else 0
    recorded = read_manifest()
    known = set(golden_files())
    for arg in argv:
        path = Path(arg).resolve()
        name = path.relative_to(GOLDEN_DIR).as_posix() if path.is_relative_to(GOLDEN_DIR) else arg
        if name not in known:
            print(f"not a golden file: {arg}", file=sys.stderr)
            return 2
        recorded[name] = digest(name)
    # Entries of files that no longer exist go: the manifest lists exactly the golden files.
    write_manifest({name: sha for name, sha in recorded.items() if name in known})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
