"""The signal store: every expensive per-example value, computed once and found again.

A *signal* is a named, parameterised function of one example (an LLM rating, an answer loss, an
embedding, a tag list). Its id is ``name.<sha256(name, canonical JSON of params, version)[:16]>``,
and its values are keyed by the example's content ``uid``, not by dataset or run: a rating paid
for once is found again by any method, run or dataset holding the same example.

On disk, ``signals/<signal_id>/part-*.parquet`` are immutable parts with columns
``uid, value, raw, error, final``. Each part is written under a temporary name, flushed and renamed, so a
crash never leaves a torn part. :meth:`SignalStore.fill` is the one batching loop of the project:
it computes only what is missing (an anti-join), one batch at a time, each batch durable before
the next starts, so a killed run loses at most the batch in flight. A failure for one example is a
row with its error text, never a dropped row or a default value; it is retried on later runs up to
``max_attempts``, unless it is marked ``final`` (asking again cannot change it).

A failure of the *service* (a dead server, a wrong key) is no example's fault: the compute function
leaves those rows out (``None`` outcomes) and sets :attr:`BatchResult.abort`; the fill writes what
the batch did get and raises :class:`FillAborted`, and no example's attempts are spent. Two runs
filling one signal at once lease their batches (:mod:`.leases`), so no example is paid for twice.
:meth:`SignalStore.reset` makes failed rows count as untried again (``sft-select signals --retry``).

The catalog has one writer: a store made with ``catalog=None`` (a worker filling a shard, see
``tasks/scale.py``) writes parts and never opens the catalog; each part carries what it cost in its
Parquet metadata, so :meth:`SignalStore.reconcile`, run by the flow's process, indexes it with its
cost. The root may be an fsspec URL (``s3://bucket/signals``, see :mod:`.fs`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from .catalog import Catalog
from .fs import filesystem, is_url, no_space
from .leases import Leases

Kind = Literal["float", "vector", "tags", "json", "text"]
VALUE_DTYPES: dict[str, pl.DataType] = {
    "float": pl.Float64(),
    "vector": pl.List(pl.Float32),
    "tags": pl.List(pl.String),
    "json": pl.String(),
    "text": pl.String(),
}
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
USAGE_KEY = "sft_select.usage"  # a part's cost (calls, tokens, seconds), in its Parquet metadata


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


@dataclass(frozen=True)
class Signal:
    """A named, parameterised per-example value. ``params`` must hold everything the value depends
    on (model, prompt version, template, max length...), since they make its identity."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    version: str = "1"
    kind: Kind = "float"

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"signal name {self.name!r} must match {_NAME.pattern}")
        if self.kind not in VALUE_DTYPES:
            raise ValueError(f"signal kind {self.kind!r} is not one of {', '.join(VALUE_DTYPES)}")

    @property
    def id(self) -> str:
        digest = hashlib.sha256(canonical_json([self.name, dict(self.params), self.version]).encode()).hexdigest()
        return f"{self.name}.{digest[:16]}"

    @property
    def model(self) -> str:
        return str(self.params.get("model", ""))


@dataclass
class Outcome:
    """One example's result: a value, or an error (with the raw model text where there is one)."""

    value: Any = None
    error: str | None = None
    raw: str | None = None
    final: bool = False  # an error that asking again cannot fix (e.g. a greedy answer that does not parse)


@dataclass
class BatchResult:
    """What a compute function returns for one batch: outcomes aligned with the batch's rows, and
    what the batch cost (``calls``, ``prompt_tokens``, ``completion_tokens``, ``cost_usd``).

    ``abort``: why the fill must stop after this batch (the service failed, not the examples); the
    rows whose outcome is ``None`` were not answered and are not stored, so they cost no attempt."""

    outcomes: list[Outcome | None]
    usage: dict[str, float] = field(default_factory=dict)
    abort: str | None = None

    @classmethod
    def of(cls, values: Iterable[Any], **usage: float) -> BatchResult:
        return cls([Outcome(value=v) for v in values], dict(usage))


@dataclass
class FillReport:
    """What :meth:`SignalStore.fill` did in this call: how many values were asked for, found
    stored, computed here (``errors`` of them failed), and computed meanwhile by another run."""

    signal_id: str
    requested: int
    reused: int
    computed: int = 0
    errors: int = 0
    batches: int = 0
    by_others: int = 0
    usage: dict[str, float] = field(default_factory=dict)


class NotFilled(RuntimeError):
    """A value was read from a signal that a dry run only planned (see :attr:`SignalStore.planned`):
    the run stops there, since what follows depends on values that were not paid for."""


class FillAborted(RuntimeError):
    """The compute function's service failed (see :attr:`BatchResult.abort`); every batch before,
    and what this one got, is on disk. ``report`` says what the fill did until then."""

    def __init__(self, message: str, report: FillReport):
        super().__init__(message)
        self.report = report


Compute = Callable[[pl.DataFrame], BatchResult]


class SignalStore:
    def __init__(self, root: str | Path, catalog: Catalog | None):
        """``root``: a folder or an fsspec URL. ``catalog``: None for a worker's store, which writes
        parts and leaves their indexing to the catalog's one writer (:meth:`reconcile`)."""
        self.url = str(root) if is_url(str(root)) else None
        self.fs, base = filesystem(self.url) if self.url else (None, "")
        self.root: Path | str = base.rstrip("/") if self.url else Path(root)
        self.catalog = catalog
        # ids of signals a dry run planned instead of filling: reading one raises NotFilled
        self.planned: set[str] = set()

    @property
    def location(self) -> str:
        """What a worker needs to open this store: the URL, or the folder."""
        return self.url or str(self.root)

    def _filled(self, signal: Signal) -> None:
        if signal.id in self.planned:
            raise NotFilled(f"{signal.id} was planned, not computed (a dry run stops where its values are needed)")

    def get(self, signal_id: str) -> Signal:
        """The signal the catalog knows by ``signal_id`` (or by a prefix naming one signal)."""
        rows = self.catalog.query("SELECT signal_id, name, params, version, kind FROM signals "
                                  "WHERE starts_with(signal_id, ?) ORDER BY signal_id", [signal_id])
        exact = rows.filter(pl.col("signal_id") == signal_id)
        rows = exact if exact.height else rows
        if rows.height != 1:
            known = "no signal" if rows.height == 0 else f"{rows.height} signals ({', '.join(rows['signal_id'])})"
            raise KeyError(f"{known} match {signal_id!r}; `sft-select signals` lists them")
        row = rows.row(0, named=True)
        return Signal(row["name"], json.loads(row["params"]), version=row["version"], kind=row["kind"])

    def register(self, signal: Signal) -> None:
        """List ``signal`` in the catalog (once), and index parts a killed process left unlisted."""
        self.catalog.register_signal(signal.id, signal.name, dict(signal.params), signal.version, signal.kind,
                                     signal.model)
        self.reconcile(signal)

    def dir(self, signal: Signal) -> Path | str:
        return self.root / signal.id if isinstance(self.root, Path) else f"{self.root}/{signal.id}"

    # -- files: a local folder, or an fsspec filesystem ----------------------------------------

    def _list(self, folder: Path | str, pattern: str) -> list:
        if self.fs is None:
            return sorted(folder.glob(pattern)) if folder.is_dir() else []
        return sorted(self.fs.glob(f"{folder}/{pattern}"))

    def _read(self, paths: list, columns: list[str] | None = None, with_paths: bool = False) -> pl.LazyFrame:
        """The rows of these parts in order (with the file path as ``_path`` when asked)."""
        if self.fs is None:
            scan = pl.scan_parquet(paths, include_file_paths="_path" if with_paths else None)
            return scan if columns is None else scan.select([*columns, *(["_path"] if with_paths else [])])
        frames = []
        for path in paths:
            df = pl.from_arrow(pq.read_table(path, columns=columns, filesystem=self.fs))
            frames.append(df.with_columns(_path=pl.lit(str(path))) if with_paths else df)
        return pl.concat(frames, how="vertical_relaxed").lazy()

    def _rel(self, path: Path | str) -> str:
        return str(path.relative_to(self.root)) if isinstance(path, Path) else str(path)[len(self.root) + 1:]

    def _put(self, folder: Path | str, name: str, df: pl.DataFrame, **options: Any) -> Path | str:
        """Write ``df`` as the immutable file ``folder/name``: never seen half written. A full disk
        raises :class:`~.fs.StoreFull` and leaves nothing behind."""
        if self.fs is not None:  # one PUT: the object exists whole or not at all
            final = f"{folder}/{name}"
            with self.fs.open(final, "wb") as f:
                df.write_parquet(f, **options)
            return final
        folder.mkdir(parents=True, exist_ok=True)
        tmp, final = folder / f".tmp-{name}", folder / name
        data = io.BytesIO()  # encoded first, so that a full disk is the file's own OSError
        df.write_parquet(data, **options)
        try:
            with tmp.open("wb") as f:
                f.write(data.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            tmp.rename(final)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if (full := no_space(e, folder, f"a part of {df.height} rows")) is not None:
                raise full from e
            raise
        return final

    def _parts(self, signal: Signal) -> list:
        return self._list(self.dir(signal), "part-*.parquet")

    def _scan(self, signal: Signal) -> pl.LazyFrame | None:
        parts = self._parts(signal)
        if not parts:
            return None
        # Part names sort by creation time; the row order inside is kept, so "last" is the newest.
        return self._read(parts)

    def _resets(self, signal: Signal) -> list:
        return self._list(self.dir(signal) / "resets" if self.fs is None else f"{self.dir(signal)}/resets",
                          "reset-*.parquet")

    def _rows(self, signal: Signal) -> pl.LazyFrame | None:
        """Every stored row, less the error rows written before a :meth:`reset` of their uid."""
        parts, resets = self._parts(signal), self._resets(signal)
        if not parts or not resets:
            return self._scan(signal)
        stamp = pl.col("_path").str.extract(r"(?:part|reset)-(\d{20})", 1).cast(pl.Int64)
        last_reset = self._read(resets, with_paths=True).group_by("uid").agg(_reset=stamp.max())
        return (self._read(parts, with_paths=True)
                .with_row_index("_order")
                .join(last_reset, on="uid", how="left")
                .filter(pl.col("error").is_null() | pl.col("_reset").is_null() | (stamp > pl.col("_reset")))
                .sort("_order")
                .drop("_path", "_order", "_reset"))

    def status(self, signal: Signal) -> pl.DataFrame:
        """Per uid: ``ok`` (a value exists), ``attempts`` (rows stored since the last reset, errors
        included) and ``final`` (an error marked as not worth retrying)."""
        scan = self._rows(signal)
        if scan is None:
            return pl.DataFrame(schema={"uid": pl.String, "ok": pl.Boolean, "attempts": pl.UInt32,
                                        "final": pl.Boolean})
        return (scan.group_by("uid")
                .agg(ok=pl.col("error").is_null().any(), attempts=pl.len().cast(pl.UInt32), final=pl.col("final").any())
                .collect())

    def missing(self, signal: Signal, uids: Sequence[str] | pl.Series, max_attempts: int = 3) -> list[str]:
        """The uids (in the given order) with no value yet, no final error and fewer than
        ``max_attempts`` errors."""
        wanted = pl.DataFrame({"uid": pl.Series(list(uids), dtype=pl.String)}).unique("uid", maintain_order=True)
        done = self.status(signal).filter(pl.col("ok") | pl.col("final") | (pl.col("attempts") >= max_attempts))
        return wanted.join(done, on="uid", how="anti", maintain_order="left")["uid"].to_list()

    def write(self, signal: Signal, uids: Sequence[str], outcomes: Sequence[Outcome | None],
              usage: Mapping[str, float] | None = None) -> Path | None:
        """Append one immutable part (temp name, fsync, rename), then index it in the catalog.
        ``None`` outcomes (not answered) are not stored; with none answered, nothing is written."""
        if len(uids) != len(outcomes):
            raise ValueError(f"{signal.id}: {len(outcomes)} outcomes for {len(uids)} uids")
        kept = [(u, o) for u, o in zip(uids, outcomes) if o is not None]
        if not kept:
            return None
        uids, outcomes = [u for u, _ in kept], [o for _, o in kept]
        df = pl.DataFrame(
            {
                "uid": list(uids),
                "value": [o.value if o.error is None else None for o in outcomes],
                "raw": [o.raw for o in outcomes],
                "error": [o.error for o in outcomes],
                "final": [o.error is not None and o.final for o in outcomes],
            },
            schema={"uid": pl.String, "value": VALUE_DTYPES[signal.kind], "raw": pl.String, "error": pl.String,
                    "final": pl.Boolean},
        )
        if signal.kind == "vector":  # fixed width: compact on disk, zero-copy into numpy
            widths = df["value"].list.len().drop_nulls().unique()
            if widths.len() == 1:
                df = df.with_columns(pl.col("value").list.to_array(int(widths[0])))
        name = f"part-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        usage = {k: float(v) for k, v in (usage or {}).items()}
        # float vectors barely compress, and uncompressed pages decode several times faster
        final = self._put(self.dir(signal), name, df, compression="uncompressed" if signal.kind == "vector" else "zstd",
                          metadata={USAGE_KEY: json.dumps(usage, sort_keys=True)})
        if self.catalog is not None:
            self.catalog.add_part(signal.id, self._rel(final), df.height, int(df["error"].is_not_null().sum()), usage)
        return final

    def reset(self, signal: Signal, uids: Sequence[str] | None = None, *, final: bool = False) -> list[str]:
        """Make the failed rows of ``signal`` (of ``uids``, or all) count as never tried, so the next
        fill asks again: errors that may be retried or have used up their attempts, and with
        ``final`` also the final ones. Rows with a value are never touched; the error rows stay on
        disk (a reset is itself an immutable file). Returns the uids reset."""
        rows = self.read(signal, uids)
        failed = rows.filter(pl.col("error").is_not_null() & (final | ~pl.col("final")))["uid"].to_list()
        if failed:
            folder = self.dir(signal) / "resets" if self.fs is None else f"{self.dir(signal)}/resets"
            name = f"reset-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
            self._put(folder, name, pl.DataFrame({"uid": failed}, schema={"uid": pl.String}))
        return failed

    def reconcile(self, signal: Signal) -> int:
        """Index parts that are on disk but not in the catalog (written by a worker's store, or by a
        process killed between the rename and the catalog insert), with the cost each part records.
        The files are the truth; the catalog is their index."""
        parts = {self._rel(p): p for p in self._parts(signal)}
        if not parts:
            return 0
        known = set(self.catalog.query("SELECT path FROM signal_parts WHERE signal_id = ?", [signal.id])["path"])
        added = 0
        for rel, path in parts.items():
            if rel not in known:
                with (path.open("rb") if self.fs is None else self.fs.open(path, "rb")) as f:
                    part = pq.ParquetFile(f)
                    usage = json.loads((part.metadata.metadata or {}).get(USAGE_KEY.encode(), b"{}"))
                    errors = pl.from_arrow(part.read(columns=["error"]))["error"].is_not_null().sum()
                self.catalog.add_part(signal.id, rel, part.metadata.num_rows, int(errors), usage)
                added += 1
        return added

    def fill(
        self,
        signal: Signal,
        examples: pl.DataFrame,
        compute: Compute,
        *,
        batch_size: int = 32,
        max_attempts: int = 3,
        order_by: Callable[[pl.DataFrame], pl.DataFrame] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> FillReport:
        """Compute ``signal`` for the examples (a frame with a ``uid`` column) that lack it.

        ``order_by`` may reorder the missing rows before batching (the loss engine sorts by length
        to cut padding). ``progress(done, total)`` is called after every durable batch. Raises
        :class:`FillAborted` after storing a batch whose :attr:`BatchResult.abort` is set.
        """
        if self.catalog is not None:  # a worker's store leaves this to the catalog's writer
            self.register(signal)
        seen = set(self._parts(signal))  # before reading status: a part written after it is seen as new
        examples = examples.unique("uid", maintain_order=True)
        todo_uids = self.missing(signal, examples["uid"], max_attempts)
        report = FillReport(signal.id, requested=examples.height, reused=examples.height - len(todo_uids))
        todo = examples.join(pl.DataFrame({"uid": todo_uids}, schema={"uid": pl.String}), on="uid",
                             how="semi", maintain_order="left")
        if order_by is not None and todo.height:
            todo = order_by(todo)
        leases, total = Leases(self.dir(signal), fs=self.fs), todo.height
        while todo.height:
            with leases.locked():
                # parts another run wrote since we looked: their uids are paid for
                new = [p for p in self._parts(signal) if p not in seen]
                seen.update(new)
                if new:
                    done = self._read(new, ["uid"]).collect()["uid"].to_list()
                    report.by_others += int(todo["uid"].is_in(done).sum())
                    todo = todo.filter(~pl.col("uid").is_in(done))
                busy = leases.held_by_others()
                batch = todo.filter(~pl.col("uid").is_in(list(busy))).head(batch_size)
                lease = leases.take(batch["uid"].to_list()) if batch.height else None
            if lease is None:
                if todo.height:  # every missing example is being computed by another run: wait for it
                    time.sleep(0.5)
                continue
            try:
                began = time.perf_counter()
                result = compute(batch)
                usage = {**result.usage, "seconds": result.usage.get("seconds", time.perf_counter() - began)}
                part = self.write(signal, batch["uid"].to_list(), result.outcomes, usage)
            finally:
                leases.release(lease)
            if part is not None:
                seen.add(part)
            todo = todo.filter(~pl.col("uid").is_in(batch["uid"].to_list()))
            answered = [o for o in result.outcomes if o is not None]
            report.batches += 1
            report.computed += len(answered)
            report.errors += sum(o.error is not None for o in answered)
            for k, v in usage.items():
                report.usage[k] = report.usage.get(k, 0.0) + v
            if result.abort is not None:
                raise FillAborted(f"{signal.id}: {result.abort}", report)
            if progress is not None:
                progress(report.computed + report.by_others, total)
        return report

    def read(self, signal: Signal, uids: Sequence[str] | pl.Series | None = None) -> pl.DataFrame:
        """One row per uid: ``uid, value, raw, error, final, attempts``; the newest value where one exists,
        else the newest error since the uid's last reset. With ``uids``, rows for those uids (absent
        ones are left out)."""
        self._filled(signal)
        scan = self._rows(signal)
        schema = {"uid": pl.String, "value": VALUE_DTYPES[signal.kind], "raw": pl.String, "error": pl.String,
                  "final": pl.Boolean, "attempts": pl.UInt32}
        if scan is None:
            return pl.DataFrame(schema=schema)
        if uids is not None:
            scan = scan.join(pl.LazyFrame({"uid": pl.Series(list(uids), dtype=pl.String)}), on="uid", how="semi")
        return (
            scan.with_columns(attempts=pl.len().over("uid").cast(pl.UInt32))
            .with_row_index("_order")
            .sort([pl.col("error").is_null(), "_order"])
            .group_by("uid")
            .last()
            .drop("_order")
            .select(list(schema))
            .collect()
        )

    def matrix(self, signal: Signal, uids: Sequence[str] | pl.Series) -> tuple[np.ndarray, np.ndarray]:
        """A vector signal as a float32 matrix aligned with ``uids`` and a mask of rows present.

        Parts are read one at a time and scattered into the preallocated matrix (newer parts
        overwrite older ones), so the peak memory is the matrix plus one part."""
        self._filled(signal)
        wanted = pl.DataFrame({"uid": pl.Series(uids, dtype=pl.String)}).with_row_index("row")
        matrix: np.ndarray | None = None
        present = np.zeros(wanted.height, dtype=bool)
        for part in self._parts(signal):
            # pyarrow decodes fixed-size lists fastest; the vectors go straight to numpy, never to Python
            table = pq.read_table(part, columns=["uid", "value", "error"], filesystem=self.fs)
            keys = pl.from_arrow(table.select(["uid", "error"])).with_row_index("pos")
            hit = keys.filter(pl.col("error").is_null()).join(wanted, on="uid", how="inner")
            if hit.height == 0:
                continue
            column = table.column("value").combine_chunks()
            if not pa.types.is_fixed_size_list(column.type):  # parts written before a width was known
                column = column.cast(pa.list_(pa.float32(), len(column[int(hit["pos"][0])])))
            block = column.values.to_numpy(zero_copy_only=False).reshape(len(column), -1)
            if matrix is None:
                matrix = np.full((wanted.height, block.shape[1]), np.nan, dtype=np.float32)
            rows = hit["row"].to_numpy()
            matrix[rows] = block[hit["pos"].to_numpy()]
            present[rows] = True
        if matrix is None:
            raise KeyError(f"signal {signal.id} has no values for these examples")
        return matrix, present

    def values(self, signal: Signal, uids: Sequence[str] | pl.Series, alias: str | None = None) -> pl.DataFrame:
        """``uid`` and the value column (named ``alias`` or the signal name) for the given uids, in
        their order; null where there is no value (never computed, or failed)."""
        self._filled(signal)
        wanted = pl.LazyFrame({"uid": pl.Series(uids, dtype=pl.String)})
        scan = self._scan(signal)
        if scan is None:
            return wanted.with_columns(pl.lit(None, VALUE_DTYPES[signal.kind]).alias(alias or signal.name)).collect()
        # Only value rows matter here; a uid computed twice (two concurrent runs) keeps the newest
        # (parts are scanned in creation order, and unique keeps the last occurrence in that order).
        got = (scan.filter(pl.col("error").is_null()).select("uid", pl.col("value").alias(alias or signal.name))
               .unique("uid", keep="last"))
        return wanted.join(got, on="uid", how="left", maintain_order="left").collect()
