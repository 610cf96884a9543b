"""The catalog: one small DuckDB file that lists datasets, signals, signal parts, selections and
evaluations. The data itself lives in Parquet files beside it, which any number of readers scan
without the catalog.

DuckDB admits one process holding a file at a time, so every use opens the file briefly and
closes it; when another process holds it, we wait and retry with backoff up to a timeout and then
raise :class:`CatalogBusy` saying which file and for how long we waited. Names and values always
travel as bind parameters, never spliced into SQL text.

A store on a read-only filesystem (an archive, a shared mount) can still be listed and exported:
reads open the file with ``read_only=True`` (and a store with no catalog yet reads as empty), while
a write raises :class:`ReadOnlyStore` naming the folder before anything is attempted.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS datasets (
    name VARCHAR, version INTEGER, fingerprint VARCHAR, path VARCHAR, rows BIGINT,
    source VARCHAR, report JSON, created_at TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS signals (
    signal_id VARCHAR PRIMARY KEY, name VARCHAR, params JSON, version VARCHAR, kind VARCHAR,
    model VARCHAR, calls BIGINT DEFAULT 0, prompt_tokens BIGINT DEFAULT 0,
    completion_tokens BIGINT DEFAULT 0, cost_usd DOUBLE DEFAULT 0, seconds DOUBLE DEFAULT 0,
    created_at TIMESTAMP DEFAULT current_timestamp);
CREATE TABLE IF NOT EXISTS signal_parts (
    signal_id VARCHAR, path VARCHAR PRIMARY KEY, rows BIGINT, errors BIGINT,
    created_at TIMESTAMP DEFAULT current_timestamp);
CREATE TABLE IF NOT EXISTS selections (
    selection_id VARCHAR PRIMARY KEY, method VARCHAR, params JSON, budget BIGINT, dataset VARCHAR,
    fingerprint VARCHAR, rows BIGINT, path VARCHAR, flow_run_id VARCHAR,
    created_at TIMESTAMP DEFAULT current_timestamp);
CREATE TABLE IF NOT EXISTS evaluations (
    evaluation_id VARCHAR, selection_id VARCHAR, model VARCHAR, suite VARCHAR, metric VARCHAR,
    value DOUBLE, n BIGINT, params JSON, created_at TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (evaluation_id, metric));
CREATE TABLE IF NOT EXISTS derived (
    kind VARCHAR, key VARCHAR, path VARCHAR, format VARCHAR, rows BIGINT, bytes BIGINT, params JSON,
    created_at TIMESTAMP DEFAULT current_timestamp, PRIMARY KEY (kind, key));
"""


class CatalogBusy(RuntimeError):
    """Another process held the catalog file for longer than the timeout."""


class ReadOnlyStore(PermissionError):
    """The store's folder cannot be written (a read-only filesystem or no permission)."""


def writable(path: Path) -> bool:
    """Whether this process may change ``path``, or create it under its nearest existing folder. Asks
    the kernel (access(2)), so a read-only mount says no even to root, who ignores file modes."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return os.access(path, os.W_OK)


def check_writable(folder: Path, what: str = "SFT_SELECT_HOME") -> None:
    """Raise :class:`ReadOnlyStore` naming ``folder`` when it cannot be written."""
    if not writable(folder):
        raise _read_only(folder, what)


def _read_only(folder: Path, what: str = "SFT_SELECT_HOME") -> ReadOnlyStore:
    return ReadOnlyStore(f"{what} {folder} is read-only: this command writes there (listing and export work "
                         f"read-only; point {what} at a writable folder to run it)")


class Catalog:
    def __init__(self, path: str | Path, lock_timeout_s: float = 60.0):
        self.path = Path(path)
        self.lock_timeout_s = lock_timeout_s
        self._ready = False

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection; waits (with jittered backoff) while another process holds the file.

        ``read_only``: the caller only reads, so a catalog that cannot be written is opened read-only
        (and one that does not exist there reads as empty); a write to it raises :class:`ReadOnlyStore`.
        """
        if not writable(self.path):
            if not read_only:
                raise _read_only(self.path.parent)
            if not self.path.exists():  # DuckDB cannot open a missing file read-only: nothing is stored
                with duckdb.connect(":memory:") as con:
                    con.execute(SCHEMA_SQL)
                    yield con
                return
        else:
            read_only = False  # a writable catalog gets its schema, and the one lock protocol below
            self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline, delay = time.monotonic() + self.lock_timeout_s, 0.02
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=read_only)
                break
            except duckdb.IOException as e:
                if "lock" not in str(e).lower():
                    raise
                if time.monotonic() >= deadline:
                    raise CatalogBusy(
                        f"catalog {self.path} is held by another process; waited {self.lock_timeout_s:.0f} s "
                        "(raise SFT_SELECT_CATALOG_LOCK_TIMEOUT_S to wait longer)"
                    ) from None
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 1.0)
        try:
            if not self._ready and not read_only:
                con.execute(SCHEMA_SQL)
                self._ready = True
            yield con
        finally:
            con.close()

    def execute(self, sql: str, params: list[Any] | None = None) -> None:
        with self.connect() as con:
            con.execute(sql, params or [])

    def query(self, sql: str, params: list[Any] | None = None) -> pl.DataFrame:
        with self.connect(read_only=True) as con:
            return con.sql(sql, params=params or None).pl()

    # -- signals ------------------------------------------------------------------------------

    def register_signal(self, signal_id: str, name: str, params: dict, version: str, kind: str, model: str) -> None:
        self.execute(
            "INSERT INTO signals (signal_id, name, params, version, kind, model) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            [signal_id, name, json.dumps(params, sort_keys=True), version, kind, model],
        )

    def add_part(self, signal_id: str, path: str, rows: int, errors: int, usage: dict[str, float]) -> None:
        with self.connect() as con:
            con.execute("INSERT INTO signal_parts (signal_id, path, rows, errors) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT DO NOTHING", [signal_id, path, rows, errors])
            con.execute(
                "UPDATE signals SET calls = calls + ?, prompt_tokens = prompt_tokens + ?, "
                "completion_tokens = completion_tokens + ?, cost_usd = cost_usd + ?, seconds = seconds + ? "
                "WHERE signal_id = ?",
                [int(usage.get("calls", 0)), int(usage.get("prompt_tokens", 0)),
                 int(usage.get("completion_tokens", 0)), float(usage.get("cost_usd", 0.0)),
                 float(usage.get("seconds", 0.0)), signal_id],
            )
