"""What every selection flow shares: the parameter fields every method takes, and ``finish``, which
saves the selection, writes the training file and publishes the artifacts."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sft_select.storage import NotFilled, write_examples
from sft_select.storage.formats import SUFFIX
from sft_select.tasks.signal_task import DatasetRef, SignalRef, get_store, planning
from sft_select.tasks.report import (cost_table, histogram_rows, publish_markdown, publish_table, shorten, stats,
                                     stats_rows)
from sft_select.tasks.select import check_budget, resolve_budget



class MethodParams(BaseModel):
    """Fields every selection method takes (the Prefect UI shows them as a form). A field that no
    method declares is an error (a typo such as ``treshold`` must not run with the default)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(description="Name of a dataset registered with `sft-select ingest`.")
    dataset_version: int | None = Field(None, description="Version of the dataset; the latest when empty.")
    budget: float | None = Field(
        0.1, description="How many examples to keep: a count (>= 1) or a fraction of the pool (< 1).")
    export: Literal["alpaca", "sharegpt", "messages", "parquet", "hf"] = Field(
        "alpaca", description="Training-file format: alpaca / sharegpt (LLaMA-Factory, Axolotl), "
                              "messages (TRL), parquet, hf (a datasets folder for load_from_disk).")
    seed: int = Field(0, description="Random seed, for methods that sample.")
    allow_partial: bool = Field(
        False, description="Accept a selection that falls short of its budget because examples failed (they "
                           "have no value); otherwise such a run saves it and then fails, saying how many failed.")

    @field_validator("budget")
    @classmethod
    def _meaningful_budget(cls, budget: float | None) -> float | None:
        return check_budget(budget)


class IncompleteSelection(RuntimeError):
    """A selection fell short of its budget because examples failed, not because of the method's rule."""


class SelectionRef(BaseModel):
    """A saved selection: its id in the catalog and the training file written for it."""

    selection_id: str
    method: str
    dataset: str
    rows: int
    export_path: str


def _key(*parts: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|")


def _failed(store, signals: Sequence[SignalRef], uids: pl.Series) -> int:
    """How many of ``uids`` have an error and no value in at least one of the signals."""
    failed: set[str] = set()
    for ref in signals:
        if ref.errors:
            rows = store.signals.read(store.signals.get(ref.signal_id), uids)
            failed.update(rows.filter(pl.col("error").is_not_null())["uid"])
    return len(failed)


@task(name="finish-selection", cache_policy=NO_CACHE)
def finish(method: str, params: MethodParams, dataset: DatasetRef, selection: pl.DataFrame,
           signals: Sequence[SignalRef] = (), failed: int | None = None) -> SelectionRef:
    """Save the ordered selection (``uid, score, reason``), export the chosen examples as a training
    file, and publish the selection's statistics next to the pool's and a summary with signal costs.
    ``failed``: how many examples of the pool have no value because they failed, for a method whose
    signals are not keyed by example (by default counted from the signals' errors)."""
    if planning() is not None:
        raise NotFilled(f"{method}: a dry run saves no selection")
    store = get_store()
    info = store.datasets.get(dataset.name, dataset.version)
    run_id = flow_run.get_id()
    selection_id = store.selections.save(method=method, params=params.model_dump(mode="json"), dataset=info,
                                         selection=selection, flow_run_id=str(run_id) if run_id else None)
    pool = dataset.read()
    chosen = selection.select("uid").join(pool, on="uid", how="left", maintain_order="left")
    path = write_examples(chosen, store.home / "exports" / f"{selection_id}{SUFFIX[params.export]}", params.export)

    publish_table(_key(method, "stats"), stats_rows({"pool": stats(pool), "selection": stats(chosen)}),
                  f"{method} on {dataset.name}@{dataset.version}: the selection next to the pool")
    head = chosen.head(20).select("instruction", "input", "output").with_columns(
        selection.head(20).select(pl.col("score").round(4), "reason"))
    md = [
        f"# {method}: {selection.height} of {dataset.rows} examples from `{dataset.name}@{dataset.version}`",
        "",
        f"Selection `{selection_id}`; training file `{path.name}` ({params.export}).",
        "",
        "## Parameters",
        "```json",
        json.dumps(params.model_dump(mode="json"), indent=2),
        "```",
        "## Signals",
        cost_table(signals),
        "## Selection scores",
        "| score | examples | |", "|---|---:|---|",
        *[f"| {r['value']} | {r['examples']} | {r['bar']} |" for r in histogram_rows(selection["score"])],
        "## First 20 selected",
        "| rank | instruction | answer | score | reason |",
        "|---:|---|---|---:|---|",
        *[f"| {i + 1} | {_cell(shorten(r['instruction'] + ' ' + (r['input'] or ''), 90))} | "
          f"{_cell(shorten(r['output'], 90))} | {r['score']} | {r['reason']} |" for i, r in enumerate(head.to_dicts())],
    ]
    publish_markdown(_key(method, "summary"), "\n".join(md), f"{method} selection summary")
    failed = _failed(store, signals, pool["uid"]) if failed is None else failed
    m = resolve_budget(params.budget, dataset.rows) if params.budget is not None else None
    if m is not None and selection.height < m and failed and not params.allow_partial:
        raise IncompleteSelection(
            f"{method} selected {selection.height} of its budget of {m} while {failed} examples of the pool have "
            f"no value because they failed (selection {selection_id} was saved); `sft-select signals` shows the "
            "errors, `sft-select signals --retry SIGNAL` asks again, or pass allow_partial to accept it")
    return SelectionRef(selection_id=selection_id, method=method, dataset=f"{dataset.name}@{dataset.version}",
                        rows=selection.height, export_path=str(Path(path)))
