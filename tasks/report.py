"""Statistics of a pool or a selection, and the Prefect artifacts that show them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import polars as pl
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import get_run_context

from .signal_task import SignalRef

log = logging.getLogger("sft_select")


def stats(examples: pl.DataFrame) -> dict[str, Any]:
    """Counts and distributions of a canonical frame: turns, prompt and answer lengths (characters)."""
    if examples.height == 0:
        return {"examples": 0}
    lengths = examples.select(
        turns=pl.col("messages").list.len(),
        instruction_chars=pl.col("instruction").str.len_chars() + pl.col("input").str.len_chars(),
        output_chars=pl.col("output").str.len_chars(),
    )
    out: dict[str, Any] = {"examples": examples.height,
                           "multi_turn": int((lengths["turns"] > 2).sum()),
                           "with_input": int((examples["input"].str.len_chars() > 0).sum())}
    for col in lengths.columns:
        s = lengths[col]
        out[col] = {"min": int(s.min()), "p25": float(s.quantile(0.25)), "median": float(s.median()),
                    "mean": round(float(s.mean()), 1), "p75": float(s.quantile(0.75)), "max": int(s.max())}
    return out


def stats_rows(columns: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """``{"pool": stats(...), "selection": stats(...)}`` as table rows (one per statistic)."""
    keys = ["examples", "multi_turn", "with_input"]
    rows = [{"statistic": k, **{name: s.get(k) for name, s in columns.items()}} for k in keys]
    for dist in ("turns", "instruction_chars", "output_chars"):
        for q in ("min", "median", "mean", "max"):
            rows.append({"statistic": f"{dist} {q}",
                         **{name: (s.get(dist) or {}).get(q) for name, s in columns.items()}})
    return rows


def histogram_rows(values: pl.Series, bins: int = 10, missing: str = "no value (error)") -> list[dict[str, Any]]:
    """A histogram as table rows (``value``, ``examples``, ``bar``): one row per value where there are
    few distinct ones (ratings 0-5), else ``bins`` equal-width bins (expected scores, losses); the
    examples without a value get a row of their own."""
    present = values.drop_nulls().drop_nans() if values.dtype.is_float() else values.drop_nulls()
    distinct = present.unique().sort()
    if distinct.len() <= 12:
        counts = [(f"{v:g}" if isinstance(v, float) else str(v), int((present == v).sum())) for v in distinct]
    else:
        low, high = float(present.min()), float(present.max())
        width = (high - low) / bins
        index = ((present.cast(pl.Float64) - low) / width).floor().clip(0, bins - 1).cast(pl.Int64)
        counts = [(f"[{low + i * width:.3g}, {low + (i + 1) * width:.3g}{']' if i == bins - 1 else ')'}",
                   int((index == i).sum())) for i in range(bins)]
    absent = values.len() - present.len()
    if absent:
        counts.append((missing, absent))
    top = max((c for _, c in counts), default=0) or 1
    return [{"value": v, "examples": c, "bar": "█" * round(30 * c / top)} for v, c in counts]


def shorten(text: str | None, chars: int = 80) -> str:
    """One line of at most ``chars`` characters (for tables a person reads)."""
    line = " ".join((text or "").split())
    return line if len(line) <= chars else line[: chars - 1] + "…"


def in_prefect_run() -> bool:
    try:
        get_run_context()
        return True
    except Exception:
        return False


def publish_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    """A table artifact when inside a Prefect run; a no-op when the plain function is called directly."""
    if in_prefect_run():
        create_table_artifact(key=key, table=rows, description=description)


def publish_markdown(key: str, markdown: str, description: str) -> None:
    if in_prefect_run():
        create_markdown_artifact(key=key, markdown=markdown, description=description)


def cost_table(signals: Sequence[SignalRef]) -> str:
    """Markdown table of what each signal cost in this run and how much was reused."""
    if not signals:
        return "No model signals: this method reads only the examples.\n"
    lines = ["| signal | computed | reused | errors | calls | tokens (prompt + completion) | seconds | cost (USD) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in signals:
        u = s.usage
        tokens = int(u.get("prompt_tokens", 0) + u.get("completion_tokens", 0))
        lines.append(f"| `{s.signal_id}` | {s.computed} | {s.reused} | {s.errors} | {int(u.get('calls', 0))} | "
                     f"{tokens} | {u.get('seconds', 0.0):.1f} | {u.get('cost_usd', 0.0):.4f} |")
    return "\n".join(lines) + "\n"
