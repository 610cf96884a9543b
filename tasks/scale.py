"""Signal fills past one machine: the missing examples split into shards, mapped over the workers of
a Ray or Dask cluster with Prefect's own task runners (``prefect-ray``'s ``RayTaskRunner``,
``prefect-dask``'s ``DaskTaskRunner``; the ``scale`` extra). The default, ``local``, is the
in-process fill of :meth:`SignalStore.fill` and loads none of them.

A sharded fill keeps every promise of the in-process one:

1. The flow's process lists the signal in the catalog, indexes stray parts, finds the missing
   examples (an anti-join), orders them as the in-process fill would (``order_by``) and cuts them
   into shards of whole batches, so every batch, and so every value, is the one the in-process
   fill computes (to the last bit where the worker's torch runs as many threads as the flow's; a
   matmul summed in another order may differ in float32's last bits).
2. Each shard is a Prefect task (``fill-shard``) on a worker. It opens the same signal store
   (``SignalStore.location``: a shared folder or an ``s3://`` URL) *without a catalog*, and runs the
   same durable batch loop: each batch leased (two runs, or a retried shard beside a live one,
   never pay for one example twice), computed, and written as its own immutable part.
3. The flow's process, the catalog's one writer, indexes the parts the shards wrote
   (:meth:`SignalStore.reconcile`, with the cost each part carries in its metadata), also when a
   shard failed, and only then raises the first failure. A worker killed mid-shard loses at most
   its batch in flight; Ray and Dask resubmit the shard elsewhere, and a re-run computes only what
   is still missing.

Shards run with the flow's settings (every ``SFT_SELECT_*`` variable and ``OPENAI_BASE_URL``), so a
worker computes exactly the signal the flow asked for. Secrets never travel with a shard: a worker
takes its API key from its own environment or from the Prefect Secret block that
``SFT_SELECT_OPENAI_KEY_BLOCK`` names.

Only per-example signals shard (embeddings, losses, judge ratings, rewards: everything made with
``signal_task``). k-means and k-center greedy stay central, in the flow's process: each step needs
every vector at once (faiss over the whole matrix), and at 10M x 384 floats (15 GB) one machine
holds it (docs/scaling.md).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from sft_select.settings import settings
from sft_select.storage import FillAborted, FillReport, Signal, SignalStore
from sft_select.storage.signals import Compute

log = logging.getLogger("sft_select")

Runner = Literal["local", "ray", "dask"]


class Scale(BaseModel):
    """Where signal fills run (a flow parameter, or the ``SFT_SELECT_TASK_RUNNER`` settings)."""

    task_runner: Runner = Field(
        "local", description="Where signal fills run: 'local' (in this process), 'ray' or 'dask' (shards of the "
                             "missing examples over a cluster's workers).")
    address: str | None = Field(None, description="The cluster: ray://HEAD:10001 (or 'auto') for Ray, "
                                                  "tcp://SCHEDULER:8786 for Dask; empty: a temporary local cluster.")
    shards: int = Field(0, ge=0, description="Shards per fill (0: one per worker of the cluster).")
    workers: int = Field(2, ge=1, description="Workers of a temporary local cluster (no address).")


_SCALE: Scale | None = None


def current_scale() -> Scale:
    """The scale of the active :func:`scale_out`, else the one the settings give."""
    if _SCALE is not None:
        return _SCALE
    s = settings()
    return Scale(task_runner=s.task_runner, address=s.task_runner_address, shards=s.shards)


@contextmanager
def scale_out(scale: Scale) -> Iterator[Scale]:
    """Run the signal fills inside on ``scale`` (a flow's parameter wins over the settings)."""
    global _SCALE
    previous, _SCALE = _SCALE, scale
    try:
        yield scale
    finally:
        _SCALE = previous


def task_runner(scale: Scale):
    """Prefect's task runner for ``scale`` (a clear error when the ``scale`` extra is missing)."""
    try:
        if scale.task_runner == "ray":
            from prefect_ray import RayTaskRunner

            return RayTaskRunner(address=scale.address, init_kwargs={} if scale.address else
                                 {"num_cpus": scale.workers, "include_dashboard": False})
        if scale.task_runner == "dask":
            from prefect_dask import DaskTaskRunner

            if scale.address:
                return DaskTaskRunner(address=scale.address)
            return DaskTaskRunner(cluster_kwargs={"n_workers": scale.workers, "threads_per_worker": 1,
                                                  "processes": True, "dashboard_address": None})
    except ImportError as e:
        raise RuntimeError(f"task runner {scale.task_runner!r} needs the scale extra: "
                           f"pip install 'sft-select[scale]' ({e})") from None
    raise ValueError(f"task runner {scale.task_runner!r} is not sharded: 'ray' or 'dask'")


def _workers(runner: Any) -> int:
    """How many tasks the runner's cluster runs at once (its CPUs for Ray, its worker threads for Dask)."""
    try:
        if type(runner).__name__ == "RayTaskRunner":
            import ray

            return max(int(ray.cluster_resources().get("CPU", 1)), 1)
        info = runner._client.scheduler_info(n_workers=-1)
        return max(sum(w.get("nthreads", 1) for w in info["workers"].values()), 1)
    except Exception:  # an engine that does not say: one shard per batch group of two
        return 2


def shards_of(todo: pl.DataFrame, n: int, batch_size: int) -> list[pl.DataFrame]:
    """``todo`` cut into at most ``n`` contiguous shards of whole batches (the last may be short),
    so each shard's batches are exactly the in-process fill's."""
    batches = math.ceil(todo.height / batch_size)
    per = math.ceil(batches / max(n, 1)) * batch_size
    return [todo.slice(start, per) for start in range(0, todo.height, per)]


def _settings_env() -> dict[str, str]:
    """The settings a shard computes with: every ``SFT_SELECT_*`` variable and the OpenAI-compatible
    server's URL; never a key (``OPENAI_API_KEY``, ``AWS_*``)."""
    return {k: v for k, v in os.environ.items() if k.startswith("SFT_SELECT_") or k == "OPENAI_BASE_URL"}


@contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    settings.cache_clear()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        settings.cache_clear()


def _folders(signal: Signal) -> dict[str, str]:
    """The local model folders the signal names by content (``folder:<sha256>``), as this process knows them."""
    from sft_select.tasks.backends import models

    named = json.dumps(dict(signal.params), default=str)
    return {identity: str(path) for identity, path in models._folders.items() if identity in named}


def _identify(folders: dict[str, str]) -> None:
    """On a worker: hash each model folder the signal names, at the same path (a shared filesystem), so
    a folder is loaded only when its content here is the content the signal was named by."""
    from sft_select.tasks.backends.models import model_identity

    for identity, path in folders.items():
        if model_identity(path) != identity:
            raise RuntimeError(f"model folder {path} on this worker is not the folder of {identity} (other content, "
                               "or absent): workers need the same model folder at the same path")


@task(name="fill-shard", task_run_name="fill-shard[{signal.name}#{index}]", cache_policy=NO_CACHE)
def fill_shard(signal: Signal, rows: pl.DataFrame, build: Callable[[Signal], Compute], location: str,
               env: dict[str, str], folders: dict[str, str], index: int, batch_size: int,
               max_attempts: int) -> dict[str, Any]:
    """On a worker: fill ``signal`` for ``rows`` with the store at ``location`` opened without a
    catalog (parts only; the flow's process indexes them). Returns the counts of
    :class:`FillReport`, and ``aborted`` when the service failed (the report travels back as data)."""
    import sft_select.tasks.prompts  # noqa: F401  (registers the judge prompts a signal names)

    with _environment(env):
        _identify(folders)
        store = SignalStore(location, catalog=None)
        compute: Compute | None = None

        def lazy(batch: pl.DataFrame):
            nonlocal compute
            if compute is None:  # a shard whose examples another run computed meanwhile loads no model
                compute = build(signal)
            return compute(batch)

        aborted = None
        try:
            report = store.fill(signal, rows, lazy, batch_size=batch_size, max_attempts=max_attempts)
        except FillAborted as e:
            report, aborted = e.report, str(e)
    # examples an earlier attempt of this shard (its worker killed) or another run stored meanwhile
    by_others = report.by_others + report.reused
    return {"computed": report.computed, "errors": report.errors, "batches": report.batches, "by_others": by_others,
            "usage": report.usage, "aborted": aborted, "pid": os.getpid()}


def fill_sharded(store, signal: Signal, examples: pl.DataFrame, build: Callable[[Signal], Compute], scale: Scale, *,
                 batch_size: int = 32, max_attempts: int = 3,
                 order_by: Callable[[pl.DataFrame], pl.DataFrame] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> FillReport:
    """:meth:`SignalStore.fill` with the missing examples' shards mapped over ``scale``'s task runner
    (see the module's docstring). Raises the first shard's failure after every part is indexed."""
    signals: SignalStore = store.signals
    signals.register(signal)
    examples = examples.unique("uid", maintain_order=True)
    todo_uids = signals.missing(signal, examples["uid"], max_attempts)
    report = FillReport(signal.id, requested=examples.height, reused=examples.height - len(todo_uids))
    if not todo_uids:
        return report
    todo = examples.join(pl.DataFrame({"uid": todo_uids}, schema={"uid": pl.String}), on="uid", how="semi",
                         maintain_order="left")
    if order_by is not None:
        todo = order_by(todo)
    env, failures = _settings_env(), []
    try:
        with task_runner(scale) as runner:
            shards = shards_of(todo, scale.shards or _workers(runner), batch_size)
            log.info("%s: %d missing of %d, in %d shards on %s", signal.id, todo.height, examples.height,
                     len(shards), scale.task_runner)
            futures = [runner.submit(fill_shard, {
                "signal": signal, "rows": shard, "build": build, "location": signals.location, "env": env,
                "folders": _folders(signal),
                "index": i, "batch_size": batch_size, "max_attempts": max_attempts}) for i, shard in enumerate(shards)]
            done = 0
            for shard, future in zip(shards, futures):
                try:
                    counts = future.result()
                except Exception as e:  # a shard whose worker died more often than the engine retries
                    failures.append(e)
                    continue
                for k in ("computed", "errors", "batches", "by_others"):
                    setattr(report, k, getattr(report, k) + counts[k])
                for k, v in counts["usage"].items():
                    report.usage[k] = report.usage.get(k, 0.0) + v
                if counts["aborted"]:
                    failures.append(FillAborted(counts["aborted"], report))
                done += shard.height
                if progress is not None:
                    progress(done, todo.height)
    finally:
        added = signals.reconcile(signal)  # the catalog's one writer indexes what the shards wrote
        log.info("%s: indexed %d parts written by the shards", signal.id, added)
    if failures:
        first = failures[0]
        if isinstance(first, FillAborted):
            raise FillAborted(str(first), report)
        raise RuntimeError(f"{signal.id}: {len(failures)} of {len(shards)} shards failed; every finished batch is "
                           f"stored and a re-run computes only what is missing (first: {first})") from first
    return report
