"""Random baseline: a uniform sample of m examples, without replacement, from a seeded generator.

Large-scale studies (Xia et al. 2024; Ivison et al. 2025) found that few selection methods beat
random at scale, so every comparison includes it at the same budget. (The file is not called
``random.py`` so that it never shadows the standard library's ``random`` when Prefect loads it.)
"""

from __future__ import annotations

import polars as pl
from prefect import flow

from sft_select.flows.common import MethodParams, SelectionRef, finish
from sft_select.tasks.signal_task import DatasetRef
from sft_select.tasks.select import resolve_budget


class RandomParams(MethodParams):
    pass


@flow(name="random", log_prints=True)
def random_subset(params: RandomParams) -> SelectionRef:
    """Keep m examples drawn uniformly at random (seeded); score = draw order."""
    dataset = DatasetRef.load(params.dataset, params.dataset_version)
    m = resolve_budget(params.budget, dataset.rows)
    uids = dataset.read(["uid"]).sort("uid")  # sorted first, so the draw depends on content, not file order
    chosen = uids.sample(m, seed=params.seed, shuffle=True)
    selection = chosen.with_columns(
        score=pl.lit(None, dtype=pl.Float64),
        reason=pl.format("random draw {} (seed {})", pl.int_range(1, m + 1), pl.lit(params.seed)),
    )
    print(f"random: {m} of {dataset.rows} examples")
    return finish("random", params, dataset, selection)
