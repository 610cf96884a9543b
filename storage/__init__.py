"""Storage: canonical examples, datasets, the signal store and the DuckDB catalog.

Knows nothing of Prefect or models. Everything lives under one folder (``SFT_SELECT_HOME``)::

    catalog.duckdb                      the catalog (datasets, signals, parts, selections, evaluations,
                                        derived results)
    datasets/<fingerprint>.parquet      examples of one dataset version
    signals/<signal_id>/part-*.parquet  immutable parts of one signal's values (or under
                                        SFT_SELECT_SIGNALS_URL, e.g. s3://bucket/signals)
    selections/<selection_id>.parquet   ordered uids with score and reason
    rejects/                            records set aside at ingest, with their reasons
    exports/                            training files written for selections
    derived/<kind>/<key>.<fmt>          derived results (k-means, k-center, DQ bins, DiverseEvol rounds,
                                        evaluations, held-out files), one file each, keyed by the
                                        content hashes of their inputs (storage/derived.py)
"""

from __future__ import annotations

from pathlib import Path

from .catalog import Catalog, CatalogBusy, ReadOnlyStore, check_writable
from .derived import Derived, DerivedStore, derived_key
from .datasets import DatasetInfo, DatasetStore, SelectionStore, check_name, fingerprint
from .examples import SCHEMA, make_example, uid_of
from .fs import StoreFull
from .formats import FORMATS, WRITE_FORMATS, InputError, ReadResult, read_examples, write_examples
from .signals import BatchResult, FillAborted, FillReport, NotFilled, Outcome, Signal, SignalStore


class Store:
    """The one entry point to everything stored under ``home``."""

    def __init__(self, home: str | Path, lock_timeout_s: float = 60.0, signals: str | None = None):
        """``signals``: where signal parts live when not under ``home`` (a folder or an fsspec URL such
        as ``s3://bucket/signals`` that workers on other machines share; see storage/fs.py)."""
        self.home = Path(home)
        self.catalog = Catalog(self.home / "catalog.duckdb", lock_timeout_s)
        self.datasets = DatasetStore(self.home / "datasets", self.catalog)
        self.signals = SignalStore(signals or self.home / "signals", self.catalog)
        self.selections = SelectionStore(self.home / "selections", self.catalog)
        self.derived = DerivedStore(self.home / "derived", self.catalog)

    def check_writable(self) -> None:
        """Fail at once, naming the folder, when the store cannot be written (before a run that would
        write to it starts, rather than at its first write)."""
        check_writable(self.home)


__all__ = [
    "FORMATS", "SCHEMA", "WRITE_FORMATS", "BatchResult", "Catalog", "CatalogBusy", "DatasetInfo", "DatasetStore",
    "Derived", "DerivedStore", "FillAborted", "FillReport", "InputError", "NotFilled", "Outcome", "ReadOnlyStore",
    "ReadResult", "SelectionStore", "Signal", "SignalStore", "Store", "StoreFull", "check_name", "check_writable",
    "derived_key",
    "fingerprint", "make_example", "read_examples", "uid_of", "write_examples",
]
