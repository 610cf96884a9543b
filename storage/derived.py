"""The derived store: results computed from signals and datasets (k-means assignments, k-center
picks, DQ bins, training rounds, evaluation results, held-out files), each computed once and
found again by the content of what it was computed from.

A result is named by its *kind* (``kmeans``, ``dq-bins``, ...) and a content key,
``sha256(canonical JSON of [kind, version, inputs])[:24]``, where ``inputs`` holds content hashes
(signal ids, dataset fingerprints, file digests, parameters), never paths. It lives in one file,
``derived/<kind>/<key>.<parquet|npy|json>``, written under a temporary name, flushed, fsynced and
renamed, so its presence means it is complete; then it gets one catalog row (``derived``: kind,
key, path, format, rows, bytes, params, created_at). A process killed between the rename and the
insert leaves a file without a row: the files are the truth, and :meth:`DerivedStore.get` (or
:meth:`DerivedStore.reconcile`) indexes it, with no recomputation.

A Parquet result may carry a small JSON ``meta`` dict (summary figures that the table cannot
hold, such as the order of k-means anchors) in the file's own key-value metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from .catalog import Catalog
from .signals import canonical_json

Format = Literal["parquet", "npy", "json"]
Payload = pl.DataFrame | np.ndarray | dict | list
FORMATS: tuple[Format, ...] = ("parquet", "npy", "json")
_META = b"sft_select.meta"


def derived_key(kind: str, inputs: Mapping[str, Any], version: str = "1") -> str:
    """The content key of a result: a hash of its kind, version and inputs (canonical JSON)."""
    return hashlib.sha256(canonical_json([kind, version, dict(inputs)]).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Derived:
    """One stored result: where it is, its size, and whether this call found it (``reused``)."""

    kind: str
    key: str
    path: Path
    format: Format
    rows: int
    bytes: int
    meta: dict[str, Any] = field(default_factory=dict)
    reused: bool = False

    def read(self) -> Payload:
        """The payload: a frame (parquet), an array (npy) or the JSON value."""
        if self.format == "parquet":
            return pl.read_parquet(self.path)
        if self.format == "npy":
            return np.load(self.path, allow_pickle=False)
        return json.loads(self.path.read_text(encoding="utf-8"))


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file whole or not at all: ``write(f)`` into a temporary name beside it, flush,
    fsync, rename. A crash leaves the old file (or none), never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        with tmp.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _describe(path: Path, fmt: Format) -> tuple[int, dict[str, Any]]:
    """(rows, meta) of a stored file, from its header where the format has one."""
    if fmt == "parquet":
        md = pq.read_metadata(path)
        raw = (md.metadata or {}).get(_META)
        return md.num_rows, json.loads(raw) if raw else {}
    if fmt == "npy":
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        return (int(array.shape[0]) if array.ndim else 1), {}
    value = json.loads(path.read_text(encoding="utf-8"))
    return (len(value) if isinstance(value, list) else 1), {}


def _write(payload: Payload, fmt: Format, f, meta: Mapping[str, Any] | None) -> None:
    if fmt == "parquet":
        if not isinstance(payload, pl.DataFrame):
            raise TypeError(f"a parquet result must be a polars DataFrame, got {type(payload).__name__}")
        table = payload.to_arrow()
        if meta:
            table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                                   _META: json.dumps(dict(meta)).encode()})
        pq.write_table(table, f, compression="zstd")
    elif fmt == "npy":
        np.save(f, np.asarray(payload), allow_pickle=False)
    else:
        f.write(json.dumps(payload, indent=1, ensure_ascii=False).encode("utf-8"))


class DerivedStore:
    def __init__(self, root: str | Path, catalog: Catalog):
        self.root = Path(root)
        self.catalog = catalog

    def path(self, kind: str, key: str, fmt: Format) -> Path:
        return self.root / kind / f"{key}.{fmt}"

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root.parent).as_posix()

    def _index(self, found: Derived, params: Mapping[str, Any] | None, replace: bool = False) -> None:
        """The catalog row of a stored file; ``replace`` overwrites a row left by an earlier file."""
        self.catalog.execute(
            f"INSERT {'OR REPLACE ' if replace else ''}INTO derived (kind, key, path, format, rows, bytes, params) "
            f"VALUES (?, ?, ?, ?, ?, ?, ?) {'' if replace else 'ON CONFLICT DO NOTHING'}",
            [found.kind, found.key, self._rel(found.path), found.format, found.rows, found.bytes,
             None if params is None else canonical_json(dict(params))])

    def _indexed(self, kind: str, key: str) -> bool:
        return self.catalog.query("SELECT 1 FROM derived WHERE kind = ? AND key = ?", [kind, key]).height > 0

    def _found(self, kind: str, key: str, fmt: Format, reused: bool) -> Derived:
        path = self.path(kind, key, fmt)
        rows, meta = _describe(path, fmt)
        return Derived(kind, key, path, fmt, rows, path.stat().st_size, meta, reused)

    def get(self, kind: str, key: str, fmt: Format = "parquet",
            params: Mapping[str, Any] | None = None) -> Derived | None:
        """The stored result, or None. A file the catalog does not list yet (its writer was killed
        before the insert) is indexed now, with ``params`` when given."""
        if not self.path(kind, key, fmt).exists():
            return None
        found = self._found(kind, key, fmt, reused=True)
        if not self._indexed(kind, key):
            self._index(found, params)
        return found

    def put(self, kind: str, key: str, payload: Payload, fmt: Format = "parquet",
            params: Mapping[str, Any] | None = None, meta: Mapping[str, Any] | None = None) -> Derived:
        """Write the result atomically (temp name, fsync, rename), then index it in the catalog."""
        if fmt not in FORMATS:
            raise ValueError(f"unknown derived format {fmt!r}: {', '.join(FORMATS)}")
        atomic_write(self.path(kind, key, fmt), lambda f: _write(payload, fmt, f, meta))
        found = self._found(kind, key, fmt, reused=False)
        self._index(found, params, replace=True)
        return found

    def get_or_compute(self, kind: str, inputs: Mapping[str, Any],
                       compute: Callable[[], Payload | tuple[pl.DataFrame, Mapping[str, Any]]], *,
                       version: str = "1", fmt: Format = "parquet") -> Derived:
        """The result of ``compute()`` for these inputs: stored once, found again by content (the
        key is :func:`derived_key`), so ``compute`` runs only when the result is not stored. For a
        Parquet result ``compute`` may return ``(frame, meta)`` to keep summary figures with it."""
        key = derived_key(kind, inputs, version)
        params = {"version": version, **inputs}
        found = self.get(kind, key, fmt, params)
        if found is not None:
            return found
        payload, meta = compute(), None
        if isinstance(payload, tuple):
            payload, meta = payload
        return self.put(kind, key, payload, fmt, params, meta)

    def reconcile(self) -> int:
        """Index every result file the catalog does not list (files are the truth); returns how many."""
        known = set(self.catalog.query("SELECT path FROM derived")["path"])
        added = 0
        for fmt in FORMATS:
            for path in sorted(self.root.glob(f"*/*.{fmt}")):
                if path.name.startswith(".") or self._rel(path) in known:
                    continue
                self._index(self._found(path.parent.name, path.stem, fmt, reused=True), None)
                added += 1
        return added

    def list(self) -> pl.DataFrame:
        """Every stored result (after :meth:`reconcile`), oldest first."""
        self.reconcile()
        return self.catalog.query("SELECT kind, key, path, format, rows, bytes, created_at, params FROM derived "
                                  "ORDER BY created_at, kind, key")
