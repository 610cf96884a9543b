"""What every task shares: the store of this process, small result references, and the helper
that turns a plain batch function into a cached, resumable Prefect task.

Tasks return small pydantic references (ids, hashes, counts), never frames: Prefect persists them
as JSON, and the data stays in the Parquet files the references name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import polars as pl
from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from sft_select.settings import settings
from sft_select.storage import DatasetInfo, Signal, Store
from sft_select.storage.signals import Compute, FillReport

log = logging.getLogger("sft_select")


@lru_cache(maxsize=4)
def _store(home: str, timeout: float, signals: str | None) -> Store:
    return Store(home, timeout, signals)


def get_store() -> Store:
    """The store under ``SFT_SELECT_HOME``, its signal parts under ``SFT_SELECT_SIGNALS_URL`` when set
    (re-read each call, so tests may point it elsewhere)."""
    s = settings()
    return _store(str(s.home), s.catalog_lock_timeout_s, s.signals_url)


class DatasetRef(BaseModel):
    """A registered dataset version: what tasks pass around instead of the examples."""

    name: str
    version: int
    fingerprint: str
    rows: int

    @classmethod
    def of(cls, info: DatasetInfo) -> DatasetRef:
        return cls(name=info.name, version=info.version, fingerprint=info.fingerprint, rows=info.rows)

    @classmethod
    def load(cls, name: str, version: int | None = None) -> DatasetRef:
        return cls.of(get_store().datasets.get(name, version))

    def read(self, columns: list[str] | None = None) -> pl.DataFrame:
        return get_store().datasets.read(self.name, self.version, columns)


class SignalRef(BaseModel):
    """A signal filled for a dataset, and what this fill did: values ``computed`` here (of which
    ``errors`` failed), found stored (``reused``) and computed meanwhile by another run."""

    signal_id: str
    name: str
    fingerprint: str
    rows: int
    computed: int
    reused: int
    errors: int
    by_others: int = 0
    usage: dict[str, float] = {}


class DryRun:
    """What a run would pay, collected instead of paying it (``sft-select run --dry-run``): while
    :func:`dry_run` is active, every signal fill records the examples it lacks, the model calls and
    an estimate of the tokens and cost, and plans the signal instead of filling it; the run stops
    where a planned value is first needed (``NotFilled``) or before anything is saved."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, signal: Signal, examples: int, missing: int, estimate: dict[str, float]) -> None:
        self.rows.append({"signal": signal.id, "model": signal.model, "examples": examples, "stored": examples - missing,
                          "to_compute": missing, "calls": int(estimate.get("calls", 0)),
                          "tokens (est.)": int(estimate.get("prompt_tokens", 0) + estimate.get("completion_tokens", 0)),
                          "cost_usd (est.)": round(estimate.get("cost_usd", 0.0), 4)})


_DRY_RUN: DryRun | None = None


@contextmanager
def dry_run() -> Iterator[DryRun]:
    """Collect what the runs inside would pay, instead of paying it (see :class:`DryRun`)."""
    global _DRY_RUN
    _DRY_RUN, store = DryRun(), get_store()
    try:
        yield _DRY_RUN
    finally:
        _DRY_RUN = None
        store.signals.planned.clear()


def planning() -> DryRun | None:
    """The active dry run, if any: expensive steps that are not signals stop with ``NotFilled``."""
    return _DRY_RUN


class SignalIncomplete(RuntimeError):
    """Some examples failed and may still be retried; raised after every batch is on disk so that
    Prefect's task retry (or a re-run) picks up exactly those."""


def fill_signal(
    signal: Signal,
    dataset: DatasetRef,
    build: Callable[[Signal], Compute],
    *,
    batch_size: int = 32,
    max_attempts: int = 3,
    order_by: Callable[[pl.DataFrame], pl.DataFrame] | None = None,
    examples: pl.DataFrame | None = None,
    progress: Callable[[int, int], None] | None = None,
    estimate: Callable[[Signal, pl.DataFrame], dict[str, float]] | None = None,
) -> SignalRef:
    """Plain function: compute ``signal`` for the dataset's examples that lack it, batch by batch.

    ``build(signal)`` returns the batch function; it is called only when something is missing, so
    a fully reused signal never loads a model. With a task runner other than ``local`` (a flow's
    :func:`~sft_select.tasks.scale.scale_out`, or ``SFT_SELECT_TASK_RUNNER``) the missing examples are
    filled in shards on a Ray or Dask cluster (:mod:`sft_select.tasks.scale`). A failure of the service
    (``FillAborted``) is raised as it is: the run stops, and no example was charged an attempt. Under :func:`dry_run` nothing is
    computed: the missing examples and ``estimate(signal, missing rows)`` (calls, tokens, cost) are
    recorded and the signal is planned.
    """
    store = get_store()
    examples = dataset.read() if examples is None else examples
    if _DRY_RUN is not None:
        unique = examples.unique("uid", maintain_order=True)
        missing = store.signals.missing(signal, unique["uid"], max_attempts)
        rows = unique.filter(pl.col("uid").is_in(missing))
        _DRY_RUN.add(signal, unique.height, rows.height, estimate(signal, rows) if estimate and rows.height else {})
        if missing:
            store.signals.planned.add(signal.id)
        return SignalRef(signal_id=signal.id, name=signal.name, fingerprint=dataset.fingerprint, rows=unique.height,
                         computed=0, reused=unique.height - rows.height, errors=0)
    compute: Compute | None = None

    def lazy(batch: pl.DataFrame):
        nonlocal compute
        if compute is None:
            compute = build(signal)
        return compute(batch)

    from sft_select.tasks.scale import current_scale, fill_sharded

    scale = current_scale()
    if scale.task_runner == "local":
        report: FillReport = store.signals.fill(signal, examples, lazy, batch_size=batch_size,
                                                max_attempts=max_attempts, order_by=order_by, progress=progress)
    else:  # shards of the missing examples over a Ray or Dask cluster (tasks/scale.py)
        report = fill_sharded(store, signal, examples, build, scale, batch_size=batch_size,
                              max_attempts=max_attempts, order_by=order_by, progress=progress)
    values = store.signals.read(signal, examples["uid"])
    errors = values.filter(pl.col("error").is_not_null())
    retryable = errors.filter(~pl.col("final") & (pl.col("attempts") < max_attempts))
    log.info("%s: %d computed in this run (%d failed), %d already stored%s; %d of %d without a value",
             signal.id, report.computed, report.errors, report.reused,
             f", {report.by_others} computed meanwhile by another run" if report.by_others else "",
             errors.height, examples.height)
    if retryable.height:
        raise SignalIncomplete(f"{signal.id}: {retryable.height} examples failed and will be retried "
                               f"(first errors: {retryable['error'].head(3).to_list()})")
    return SignalRef(signal_id=signal.id, name=signal.name, fingerprint=dataset.fingerprint, rows=examples.height,
                     computed=report.computed, reused=report.reused, errors=errors.height,
                     by_others=report.by_others, usage=report.usage)


def _retry_incomplete(task, task_run, state) -> bool:
    """Retry a signal task only for examples that failed and may be asked again; a failure of the
    service, a missing model or a bug fails at once."""
    return isinstance(state.data, SignalIncomplete)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_artifact(description: str, unit: str = "examples") -> Callable[[int, int], str]:
    """A Prefect progress artifact for the current run, and ``update(done, total)`` for it, which
    writes the counts, the rate and the time left into the artifact's description and returns
    that line."""
    artifact = create_progress_artifact(0.0, description=description)
    began = time.monotonic()

    def update(done: int, total: int) -> str:
        rate = done / max(time.monotonic() - began, 1e-9)
        line = f"{description}: {done:,}/{total:,} {unit}, {rate:.2f} {unit}/s"
        if 0 < done < total:
            line += f", about {_duration((total - done) / rate)} left"
        update_progress_artifact(artifact, 100.0 * done / max(total, 1), description=line)
        return line

    return update


def signal_task(name: str, build: Callable[[Signal], Compute], *, batch_size: int = 32, max_attempts: int = 3,
                order_by: Callable[[pl.DataFrame], pl.DataFrame] | None = None,
                retry_delay_seconds: list[float] | None = None,
                estimate: Callable[[Signal, pl.DataFrame], dict[str, float]] | None = None,
                rows: Callable[[pl.DataFrame], pl.DataFrame] | None = None):
    """Make a Prefect task ``(signal, dataset[, batch_size][, uids]) -> SignalRef`` from a batch-function
    builder; ``uids`` fills the signal for that subset of the dataset only. ``rows`` turns the
    dataset's examples into the rows the signal is filled for, keyed by their own ``uid`` (e.g.
    :func:`~sft_select.storage.examples.exchanges`: one row per exchange of a conversation).

    The task is idempotent by construction (it fills what is missing, so a second run pays for
    nothing), and not cached by Prefect: a cached result would repeat the counts of the run that
    made it. It retries ``max_attempts - 1`` times when examples failed; each retry computes only
    those. A failure of the service is not retried.
    """

    @task(name=name, task_run_name=f"{name}[{{signal.name}}]", cache_policy=NO_CACHE, retries=max_attempts - 1,
          retry_delay_seconds=retry_delay_seconds or [2, 8, 30][: max_attempts - 1],
          retry_condition_fn=_retry_incomplete)
    def run(signal: Signal, dataset: DatasetRef, batch_size: int = batch_size,
            uids: list[str] | None = None) -> SignalRef:
        examples = None
        if uids is not None:  # a subset of the dataset (e.g. the examples a method probes)
            examples = dataset.read().join(pl.DataFrame({"uid": uids}, schema={"uid": pl.String}), on="uid",
                                           how="semi")
        if rows is not None:
            examples = rows(dataset.read() if examples is None else examples)
        bar = progress_artifact(f"{signal.id} on {dataset.name}@{dataset.version}")

        def progress(done: int, total: int) -> None:
            log.info(bar(done, total))

        return fill_signal(signal, dataset, build, batch_size=batch_size, max_attempts=max_attempts,
                           order_by=order_by, examples=examples, progress=progress, estimate=estimate)

    return run
