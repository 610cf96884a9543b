"""The main job on embedded defaults: ingest a pool, run every registered method at one budget
with the local models, and print how the selections compare."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from prefect import flow

from sft_select.flows.common import SelectionRef
from sft_select.flows.ingest import IngestParams, ingest
from sft_select.flows.registry import load_flow, params_model
from sft_select.tasks.signal_task import get_store
from sft_select.tasks.report import publish_table

DEMO_POOL = Path(__file__).parent / "data" / "demo_pool.jsonl"
# The methods the demo runs: each finishes in a minute or two on a laptop CPU with the local models.
DEMO_METHODS = ["random", "longest", "coreset", "alpagasus"]


def comparison(refs: list[SelectionRef], dataset: str) -> pl.DataFrame:
    """One row per selection: size, mean response length, and overlap (Jaccard) with random."""
    store = get_store()
    pool = store.datasets.read(dataset)
    chosen = {r.method: set(store.selections.read(r.selection_id)["uid"]) for r in refs}
    base = chosen.get("random", set())
    rows = []
    for r in refs:
        sel = pool.filter(pl.col("uid").is_in(list(chosen[r.method])))
        union = chosen[r.method] | base
        rows.append({
            "method": r.method,
            "selected": r.rows,
            "mean response chars": round(float(sel["output"].str.len_chars().mean() or 0), 1),
            "mean prompt chars": round(float(sel["instruction"].str.len_chars().mean() or 0), 1),
            "jaccard with random": round(len(chosen[r.method] & base) / len(union), 3) if union else None,
        })
    rows.append({"method": "(pool)", "selected": pool.height,
                 "mean response chars": round(float(pool["output"].str.len_chars().mean()), 1),
                 "mean prompt chars": round(float(pool["instruction"].str.len_chars().mean()), 1),
                 "jaccard with random": None})
    return pl.DataFrame(rows)


@flow(name="demo", log_prints=True)
def demo(path: str | None = None, budget: float = 0.2, methods: list[str] | None = None) -> list[SelectionRef]:
    """Ingest ``path`` (default: the shipped demo pool) as dataset ``demo`` and run each method
    (default: ``DEMO_METHODS``)."""
    name = "demo" if path is None else Path(path).stem.replace(" ", "_")
    dataset = ingest(IngestParams(path=str(path or DEMO_POOL), name=name, on_error="skip"))
    refs = []
    for method in methods or DEMO_METHODS:
        selection_flow = load_flow(method)
        model = params_model(selection_flow)
        # every method keeps its m best at the one budget (a paper's threshold would change the budget)
        extra = {"threshold": None} if "threshold" in model.model_fields else {}
        refs.append(selection_flow(model(dataset=dataset.name, budget=budget, **extra)))
    table = comparison(refs, dataset.name)
    publish_table("demo-comparison", table.to_dicts(), f"methods on {dataset.name} at budget {budget}")
    with pl.Config(tbl_rows=50, tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True, tbl_width_chars=140):
        print(f"\nSelections from {dataset.name} ({dataset.rows} examples) at budget {budget}:\n{table}")
    return refs
