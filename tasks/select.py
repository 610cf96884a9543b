"""Selection rules shared by the methods: budgets, top-m and thresholds with deterministic ties."""

from __future__ import annotations

import math

import polars as pl


def check_budget(budget: float | None) -> float | None:
    """``budget`` unchanged when it means something: a count (a whole number >= 1), a fraction of the
    pool (0 < budget < 1) or None (the whole pool). nan, inf, 0, negatives and 2.5 raise, rather than
    being rounded into a budget nobody asked for."""
    if budget is None:
        return None
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget must be a count (a whole number >= 1) or a fraction of the pool "
                         f"(0 < budget < 1), got {budget}")
    if budget > 1 and not float(budget).is_integer():
        raise ValueError(f"budget {budget} is neither a count (a whole number) nor a fraction of the pool (< 1)")
    return budget


def resolve_budget(budget: float | None, pool: int) -> int:
    """A budget as a count: ``budget >= 1`` is a count, ``0 < budget < 1`` a fraction of the pool
    (rounded up), ``None`` the whole pool. A count above the pool is an error naming the pool's size:
    handing back the whole pool instead would pass for the selection that was asked for."""
    if check_budget(budget) is None:
        return pool
    if budget < 1:
        return math.ceil(budget * pool)
    if budget > pool:
        raise ValueError(f"budget {int(budget)} is more than the pool's {pool} examples: ask for at most {pool}, "
                         "or a fraction (< 1)")
    return int(budget)


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
