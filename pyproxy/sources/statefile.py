"""Cluster state from a file: what `kubectl get services,endpointslices,nodes -A -o yaml` prints.

Accepts a `v1 List` (or any `*List` with `items`), a multi-document YAML stream of objects or
lists, or JSON (which is YAML). An unreadable or unparsable file raises StateFileError, so
nothing is programmed from half a file; invalid objects inside a good file are the converter's
business (skipped with a warning).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import yaml

from pyproxy.convert import state_from_objects
from pyproxy.errors import InvalidObject, StateFileError
from pyproxy.model import ClusterState

# libyaml is ~10x faster on big dumps; fall back to the pure-Python loader.
_Loader: type[yaml.CSafeLoader] | type[yaml.SafeLoader] = getattr(
    yaml, "CSafeLoader", yaml.SafeLoader
)


def _objects(doc: object, path: Path, index: int) -> Iterator[Mapping[str, object]]:
    if doc is None:
        return
    if not isinstance(doc, Mapping):
        raise StateFileError(f"{path}: document {index} is not a Kubernetes object or List")
    items = doc.get("items")
    kind = doc.get("kind")
    if isinstance(kind, str) and kind.endswith("List") and isinstance(items, list):
        item_kind = kind[: -len("List")]
        for item in items:
            if isinstance(item, Mapping):
                # `kubectl get` of one kind omits `kind` on items of a typed List.
                yield item if "kind" in item else {**item, "kind": item_kind}
        return
    yield doc


def read_objects(path: Path) -> list[Mapping[str, object]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise StateFileError(f"cannot read state file {path}: {err}") from err
    try:
        docs = list(yaml.load_all(text, Loader=_Loader))
    except yaml.YAMLError as err:
        raise StateFileError(f"cannot parse state file {path}: {err}") from err
    objects: list[Mapping[str, object]] = []
    for index, doc in enumerate(docs):
        objects.extend(_objects(doc, path, index))
    return objects


def load_state(path: Path) -> tuple[ClusterState, list[InvalidObject]]:
    return state_from_objects(read_objects(path))
