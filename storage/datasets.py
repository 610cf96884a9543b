"""Datasets and selections: named, versioned sets of examples stored once as Parquet.

A dataset's fingerprint is sha256 of its sorted uids. Its examples are written to
``datasets/<fingerprint>.parquet`` (content-addressed, so two names for the same content share one
file). Registering the same content under a name again is a no-op; changed content makes version
``n + 1``. A selection is an ordered list of uids with a score and a reason each, stored as
``selections/<selection_id>.parquet`` and listed in the catalog.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from .catalog import Catalog
from .derived import atomic_write
from .examples import SCHEMA

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_name(name: str, what: str = "dataset") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{what} name {name!r} is not allowed: use letters, digits, '_', '.', '-' "
                         "(starting with a letter or digit, at most 128)")
    return name


def fingerprint(uids: pl.Series | list[str]) -> str:
    ordered = sorted(set(uids))
    return hashlib.sha256("\n".join(ordered).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    version: int
    fingerprint: str
    rows: int
    path: Path
    created: bool = False


class DatasetStore:
    def __init__(self, root: str | Path, catalog: Catalog):
        self.root = Path(root)
        self.catalog = catalog

    def register(self, name: str, examples: pl.DataFrame, *, source: str = "",
                 report: dict[str, Any] | None = None) -> DatasetInfo:
        """Store ``examples`` under ``name``; a new version only when the content changed."""
        check_name(name)
        if examples.height == 0:
            raise ValueError(f"dataset {name!r}: no examples to register")
        examples = examples.select(list(SCHEMA)).unique("uid", maintain_order=True)
        fp = fingerprint(examples["uid"])
        path = self.root / f"{fp}.parquet"
        if not path.exists():
            atomic_write(path, examples.write_parquet)
        with self.catalog.connect() as con:
            latest = con.execute("SELECT version, fingerprint FROM datasets WHERE name = ? ORDER BY version DESC "
                                 "LIMIT 1", [name]).fetchone()
            if latest and latest[1] == fp:
                return DatasetInfo(name, latest[0], fp, examples.height, path, created=False)
            version = (latest[0] + 1) if latest else 1
            con.execute("INSERT INTO datasets (name, version, fingerprint, path, rows, source, report) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [name, version, fp, path.name, examples.height, source, json.dumps(report or {})])
        return DatasetInfo(name, version, fp, examples.height, path, created=True)

    def get(self, name: str, version: int | None = None) -> DatasetInfo:
        check_name(name)
        sql = "SELECT version, fingerprint, rows, path FROM datasets WHERE name = ?"
        params: list[Any] = [name]
        if version is not None:
            sql += " AND version = ?"
            params.append(version)
        with self.catalog.connect(read_only=True) as con:
            row = con.execute(sql + " ORDER BY version DESC LIMIT 1", params).fetchone()
        if row is None:
            known = ", ".join(self.list()["name"].unique().sort().to_list()) or "none yet"
            raise KeyError(f"no dataset named {name!r}" + (f" with version {version}" if version else "")
                           + f" (datasets: {known}; add one with `sft-select ingest`)")
        return DatasetInfo(name, row[0], row[1], row[2], self.root / row[3])

    def read(self, name: str, version: int | None = None, columns: list[str] | None = None) -> pl.DataFrame:
        return pl.read_parquet(self.get(name, version).path, columns=columns)

    def list(self) -> pl.DataFrame:
        return self.catalog.query("SELECT name, version, rows, fingerprint, source, created_at FROM datasets "
                                  "ORDER BY name, version")


class SelectionStore:
    def __init__(self, root: str | Path, catalog: Catalog):
        self.root = Path(root)
        self.catalog = catalog

    def save(self, *, method: str, params: dict[str, Any], dataset: DatasetInfo, selection: pl.DataFrame,
             flow_run_id: str | None = None) -> str:
        """Store an ordered selection (columns ``uid``, ``score``, ``reason``); returns its id, which
        is a hash of method, parameters and dataset content, so re-running the same choice replaces it."""
        check_name(method, "method")
        key = json.dumps([method, params, dataset.fingerprint], sort_keys=True, default=str)
        selection_id = f"{method}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        frame = selection.select(
            pl.col("uid").cast(pl.String),
            pl.int_range(1, selection.height + 1, dtype=pl.UInt32).alias("rank"),
            pl.col("score").cast(pl.Float64),
            pl.col("reason").cast(pl.String),
        )
        atomic_write(self.root / f"{selection_id}.parquet", frame.write_parquet)
        with self.catalog.connect() as con:
            con.execute("DELETE FROM selections WHERE selection_id = ?", [selection_id])
            con.execute("INSERT INTO selections (selection_id, method, params, budget, dataset, fingerprint, rows, "
                        "path, flow_run_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [selection_id, method, json.dumps(params, sort_keys=True, default=str), frame.height,
                         f"{dataset.name}@{dataset.version}", dataset.fingerprint, frame.height,
                         f"{selection_id}.parquet", flow_run_id])
        return selection_id

    def read(self, selection_id: str) -> pl.DataFrame:
        check_name(selection_id, "selection")
        path = self.root / f"{selection_id}.parquet"
        if not path.exists():
            raise KeyError(f"no selection {selection_id!r} (see `sft-select selections`)")
        return pl.read_parquet(path)

    def list(self) -> pl.DataFrame:
        return self.catalog.query("SELECT selection_id, method, dataset, rows, params, flow_run_id, created_at "
                                  "FROM selections ORDER BY created_at")
