"""Selection rules shared by the methods: budgets, top-m and thresholds with deterministic ties."""

from __future__ import annotations

import math

import polars as pl


def resolve_budget(budget: float | None, pool: int) -> int:
    """A budget as a count: ``budget >= 1`` is a count, ``0 < budget < 1`` a fraction of the pool
    (rounded up), ``None`` the whole pool."""
    if budget is None:
        return pool
    if budget <= 0:
        raise ValueError(f"budget must be positive, got {budget}")
    m = math.ceil(budget * pool) if budget < 1 else int(budget)
    return min(m, pool)


def select(
    scores: pl.DataFrame,
    *,
    m: int | None = None,
    threshold: float | None = None,
    descending: bool = True,
    label: str = "score",
    strict: bool = False,
) -> pl.DataFrame:
    """Rank ``scores`` (``uid``, ``score``; null scores are never chosen) and keep those passing
    ``threshold`` (>= when descending, <= otherwise; > and < when ``strict``), then the first ``m``. Ties break by uid, so the
    same scores always give the same selection. Returns ``uid, score, reason``."""
    op = (">" if descending else "<") + ("" if strict else "=")
    ranked = scores.filter(pl.col("score").is_not_null() & pl.col("score").is_not_nan()).sort(
        ["score", "uid"], descending=[descending, False]
    )
    if threshold is not None:
        score = pl.col("score")
        ranked = ranked.filter({">=": score >= threshold, "<=": score <= threshold, ">": score > threshold,
                                "<": score < threshold}[op])
    if m is not None:
        ranked = ranked.head(m)
    rank = pl.int_range(1, pl.len() + 1).cast(pl.String)
    why = pl.format(f"{label} {{}}", pl.col("score").round(4).cast(pl.String))
    if threshold is not None:
        why = pl.concat_str([why, pl.lit(f" {op} {threshold}")])
    return ranked.select("uid", "score", pl.concat_str([why, pl.lit(", rank "), rank]).alias("reason"))
