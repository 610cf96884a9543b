"""Statistics of a pool or a selection, and the Prefect artifacts that show them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import polars as pl
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import get_run_context

from .core import SignalRef

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
