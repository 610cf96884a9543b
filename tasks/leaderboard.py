"""The leaderboard of a comparison: paired statistics against random, ranks, the chart and the report.

Plain functions over :class:`LeaderboardRow` (what ``flows/compare.py`` measured for one selection);
the flow only orchestrates. Every row's headline metric is also shown as its paired difference to
the random baseline's model on the same evaluation items,
``mean_i(q_i - r_i) +/- 1.96 * sd / sqrt(n)``, and the chart draws exactly that: one point and its
95% interval per row, a line at zero (random), so a reader sees at once which differences are
evidence and which are noise. Rows with the same headline value share a rank.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from pathlib import Path
from typing import Any, Literal

import polars as pl
from pydantic import BaseModel, Field

from sft_select.tasks.signal_task import get_store
from sft_select.tasks.evaluate import EvaluationRef, Suite, model_id
from sft_select.tasks.finetune import FinetunedRef
from sft_select.tasks.report import publish_markdown, publish_table

# suite -> (headline metric, higher is better)
HEADLINE: dict[str, tuple[str, bool]] = {
    "reference_loss": ("loss", False),
    "ifeval": ("prompt_strict", True),
    "judge_pairwise": ("win_rate", True),
    "mt_bench": ("score", True),
}
# suite -> (item key columns, per-item value of the headline metric) in the suite's details file
ITEM_VALUES: dict[str, tuple[list[str], pl.Expr]] = {
    "reference_loss": (["uid"], pl.col("loss")),
    "ifeval": (["key"], pl.col("strict").list.all().cast(pl.Float64)),
    "judge_pairwise": (["uid"], pl.col("score")),
    "mt_bench": (["question_id", "turn"], pl.col("rating")),
}


class LeaderboardRow(BaseModel):
    """One row of the leaderboard: a selection, the model tuned on it and what it scored."""

    method: str
    kind: Literal["method", "baseline", "reference"]
    selection_id: str | None
    selected: int | None
    model: str
    metrics: dict[str, float]
    vs_random: dict[str, tuple[float, float, int]] = Field(
        default_factory=dict, description="headline metric -> (mean paired difference to random, 95% half-width, "
                                          "items)")
    rank: int | None = Field(None, description="1 for the best headline value; equal values share a rank")
    trained: bool | None = Field(None, description="fine-tuned in this run (False: the cached model was reused)")
    train_steps: int | None = None
    train_loss: float | None = None
    evaluated: int = Field(0, description="suites computed in this run (the others were reused)")
    train_s: float | None = Field(None, description="wall seconds of the fine-tuning run that finished the model "
                                                    "(a resumed run counts from its restart)")
    eval_s: float | None = Field(None, description="wall seconds of all suites when they ran (None: not recorded)")
    details: list[str] = Field(default_factory=list, description="per-item details of each suite, files under "
                                                                 "<SFT_SELECT_HOME>")


def suite_name(suite: Suite, suites: list[Suite]) -> str:
    """The suite's name in column titles; the file's name is added when one suite runs on two files."""
    if sum(s.suite == suite.suite for s in suites) == 1:
        return suite.suite
    return f"{suite.suite}[{Path(suite.path).stem}]"


def headline(suite: Suite, suites: list[Suite]) -> tuple[str, bool]:
    """(column of the suite's headline metric, higher is better)."""
    metric, higher = HEADLINE[suite.suite]
    return f"{suite_name(suite, suites)}.{metric}", higher


def leaderboard_row(name: str, kind: str, selection_id: str | None, selected: int | None,
                    model: FinetunedRef | str, evaluations: list[EvaluationRef], suites: list[Suite],
                    trained: bool | None = None) -> LeaderboardRow:
    """The row of ``model`` from its evaluations, one per suite in ``suites``' order."""
    metrics: dict[str, float] = {}
    for suite, ref in zip(suites, evaluations):
        metrics.update({f"{suite_name(suite, suites)}.{k}": v for k, v in ref.metrics.items()})
    seconds = [ref.seconds for ref in evaluations]
    tuned = model if isinstance(model, FinetunedRef) else None
    return LeaderboardRow(method=name, kind=kind, selection_id=selection_id, selected=selected, model=model_id(model),
                          metrics=metrics, trained=trained, train_steps=tuned and tuned.steps,
                          train_loss=tuned and tuned.train_loss, evaluated=sum(not r.reused for r in evaluations),
                          details=[r.details for r in evaluations], train_s=tuned and tuned.runtime_s,
                          eval_s=None if None in seconds else round(sum(seconds), 2))


def paired_difference(ours: pl.DataFrame, theirs: pl.DataFrame, suite: str) -> tuple[float, float, int]:
    """(mean of q_i - r_i over the items both scored, 1.96 standard errors of that mean, items)."""
    keys, value = ITEM_VALUES[suite]
    a = ours.select(*keys, q=value)
    b = theirs.select(*keys, r=value)
    d = a.join(b, on=keys).select(d=pl.col("q") - pl.col("r")).drop_nulls().filter(pl.col("d").is_not_nan())["d"]
    if d.len() == 0:
        return math.nan, math.nan, 0
    se = float(d.std()) / math.sqrt(d.len()) if d.len() > 1 else math.nan
    return float(d.mean()), 1.96 * se, d.len()


def paired_to_random(rows: list[LeaderboardRow], suites: list[Suite]) -> list[LeaderboardRow]:
    """Each row's headline metrics as paired differences to the random baseline's, item by item."""
    random_row = next((r for r in rows if r.method == "random" and r.details), None)
    if random_row is None:
        return rows
    out = []
    for row in rows:
        diffs = {}
        if row is not random_row and row.details:
            for i, suite in enumerate(suites):
                ours, theirs = (pl.read_parquet(get_store().home / r.details[i]) for r in (row, random_row))
                diffs[headline(suite, suites)[0]] = paired_difference(ours, theirs, suite.suite)
        out.append(row.model_copy(update={"vs_random": diffs}))
    return out


def rank(rows: list[LeaderboardRow], suites: list[Suite]) -> list[LeaderboardRow]:
    """Best first by the first suite's headline metric (rows without a value last, unranked); rows
    with equal values share a rank (1, 2, 2, 4)."""
    column, higher = headline(suites[0], suites)

    def key(row: LeaderboardRow) -> tuple[bool, float]:
        v = row.metrics.get(column, math.nan)
        return (math.isnan(v), -v if higher else v)

    ordered, out = sorted(rows, key=key), []
    for i, row in enumerate(ordered):
        value = row.metrics.get(column, math.nan)
        if math.isnan(value):
            place = None
        elif i and out[-1].metrics.get(column, math.nan) == value:
            place = out[-1].rank
        else:
            place = i + 1
        out.append(row.model_copy(update={"rank": place}))
    return out


def _round(v: float | None) -> float | None:
    return None if v is None else v if math.isnan(v) else round(v, 4)


def table_rows(rows: list[LeaderboardRow], suites: list[Suite]) -> list[dict[str, Any]]:
    """The leaderboard as flat rows (table artifact, CSV)."""
    out = []
    metrics = list(dict.fromkeys(k for r in rows for k in r.metrics))
    for r in rows:
        row: dict[str, Any] = {"rank": r.rank, "method": r.method, "kind": r.kind, "selected": r.selected}
        row.update({k: _round(r.metrics.get(k, math.nan)) for k in metrics})
        for suite in suites:
            column = headline(suite, suites)[0]
            d = r.vs_random.get(column)
            row[f"{column} vs random (95%)"] = None if d is None else f"{_round(d[0]):+} ± {_round(d[1])} (n={d[2]})"
        row.update({"fine-tune": {True: "trained", False: "reused", None: None}[r.trained],
                    "train steps": r.train_steps, "train loss": _round(r.train_loss),
                    "train s": r.train_s, "eval s": r.eval_s,
                    "selection": r.selection_id, "model": r.model or None})
        out.append(row)
    return out


# -- the chart and the report --------------------------------------------------------------------

COMPACT = ("rank", "method", "kind", "selected", "fine-tune")
COLOURS = {"method": "#2563eb", "baseline": "#6b7280", "reference": "#111827"}


def difference_chart_svg(rows: list[LeaderboardRow], suites: list[Suite]) -> str:
    """One panel per suite: each row's paired difference to random on the headline metric, a dot at
    the mean and a bar over its 95% interval, a line at zero (random itself), "better" pointing the
    way the metric improves. An interval that crosses the line is no evidence of a difference."""
    width, label_w, row_h = 720, 240, 22
    plot_w = width - label_w - 150
    parts, y = [], 10
    for suite in suites:
        column, higher = headline(suite, suites)
        shown = [(r, r.vs_random.get(column)) for r in rows if r.method != "random"]
        ends = [abs(d[0]) + (0 if math.isnan(d[1]) else d[1]) for _, d in shown if d and not math.isnan(d[0])]
        half = max(ends, default=0.0) or 1.0

        def x(v: float, half: float = half) -> float:
            return label_w + plot_w * (0.5 + 0.5 * v / half)

        better = "better →" if higher else "← better"
        parts.append(f'<text x="10" y="{y + 14}" font-size="14" font-weight="bold">{html.escape(column)}: '
                     f'difference to random, 95% interval ({better})</text>')
        y += 26
        top = y
        for r, d in shown:
            label = r.method + {"baseline": " (baseline)", "reference": " (reference)"}.get(r.kind, "")
            parts.append(f'<text x="{label_w - 8}" y="{y + 14}" font-size="12" text-anchor="end">'
                         f'{html.escape(label)}</text>')
            if not d or math.isnan(d[0]):
                parts.append(f'<text x="{label_w + 4}" y="{y + 14}" font-size="12">n/a</text>')
            else:
                mean, ci, n = d
                if not math.isnan(ci):
                    parts.append(f'<line x1="{x(mean - ci):.1f}" x2="{x(mean + ci):.1f}" y1="{y + 10}" y2="{y + 10}" '
                                 f'stroke="{COLOURS[r.kind]}" stroke-width="3"/>')
                parts.append(f'<circle cx="{x(mean):.1f}" cy="{y + 10}" r="4" fill="{COLOURS[r.kind]}"/>')
                text = f"{mean:+.4g}" + ("" if math.isnan(ci) else f" ± {ci:.2g}") + f" (n={n})"
                parts.append(f'<text x="{label_w + plot_w + 8}" y="{y + 14}" font-size="11">{text}</text>')
            y += row_h
        parts.append(f'<line x1="{x(0):.1f}" x2="{x(0):.1f}" y1="{top - 4}" y2="{y}" stroke="#111827" '
                     'stroke-dasharray="4 3"/>')
        parts.append(f'<text x="{x(0):.1f}" y="{y + 12}" font-size="10" fill="#6b7280" text-anchor="middle">'
                     f'random (0); axis ±{half:.3g}</text>')
        y += 30
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y}" font-family="sans-serif">'
            f'<rect width="100%" height="100%" fill="#ffffff"/>{"".join(parts)}</svg>')


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join("" if row[c] is None else str(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def report_markdown(setup: dict[str, Any], where: str, pool: int, m: int, suites: list[Suite],
                    rows: list[LeaderboardRow], chart: str) -> str:
    """The markdown report: what was compared (the rows that ran, as they ran), the chart, the
    leaderboard and what this run computed."""
    trained, evaluated = sum(bool(r.trained) for r in rows), sum(r.evaluated for r in rows)
    flat, heads = table_rows(rows, suites), {headline(s, suites)[0] for s in suites}
    names = {r.method for r in rows}
    baselines = [b for b in ("random", "longest") if b in names]
    if "full" in names:
        baselines.append(f"full data ({pool} examples)")
    lines = [f"# Selection methods compared on `{where}`: {m} of {pool} examples each", ""]
    tuned = [r for r in rows if r.kind != "reference"]
    lines.append(f"{len(tuned)} selection(s) each fine-tune `{setup['base']}` with the same recipe; rows are ranked "
                 f"by `{headline(suites[0], suites)[0]}` (equal values share a rank). Baselines: "
                 + (", ".join(baselines) if baselines else "none") + "."
                 + (" The base model without fine-tuning is a reference row." if "reference" in {r.kind for r in rows}
                    else ""))
    if "random" in names:
        lines.append("*vs random*: the mean paired difference to the random baseline's model on the same items, "
                     "with a 95% interval; an interval that holds 0 is no evidence of a difference.")
    return "\n".join(lines + [
        "",
        chart,
        "",
        "## Leaderboard",
        markdown_table([{k: v for k, v in r.items() if k in COMPACT or k.endswith("(95%)") or k in heads}
                        for r in flat]),
        "",
        f"This run fine-tuned {trained} model(s) and computed {evaluated} evaluation(s); everything else was "
        "reused from earlier runs.",
        "",
        "## All metrics",
        markdown_table(flat),
        "",
        "## Set-up",
        "```json",
        json.dumps(setup, indent=2),
        "```",
    ])


class Published(BaseModel):
    report: str
    csv: str
    chart: str


def publish(setup: dict[str, Any], name: str, version: int, pool: int, m: int, suites: list[Suite],
            rows: list[LeaderboardRow], key: str) -> Published:
    """The leaderboard as a table artifact, the chart and the report as markdown artifacts (the
    chart inline, as an SVG data URI), and the same under ``<SFT_SELECT_HOME>/reports/`` as CSV,
    SVG and Markdown (one name per set-up, rewritten by a re-run)."""
    where = f"{name}@{version}"
    flat = table_rows(rows, suites)
    svg = difference_chart_svg(rows, suites)
    image = f"![leaderboard](data:image/svg+xml;base64,{base64.b64encode(svg.encode()).decode()})"
    run_key = hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:10]
    stem = get_store().home / "reports" / f"compare-{name}-v{version}-{run_key}"
    stem.parent.mkdir(parents=True, exist_ok=True)

    Path(f"{stem}.svg").write_text(svg, encoding="utf-8")
    Path(f"{stem}.md").write_text(report_markdown(setup, where, pool, m, suites, rows, f"![leaderboard]({stem.name}.svg)"),
                                  encoding="utf-8")
    pl.DataFrame(flat).write_csv(f"{stem}.csv")
    publish_table(f"{key}-leaderboard", flat, f"methods on {where} at budget {m}")
    publish_markdown(f"{key}-chart", image, f"paired differences to random on {where} at budget {m}")
    publish_markdown(f"{key}-report", report_markdown(setup, where, pool, m, suites, rows, image),
                     f"comparison report, {where}, budget {m}")
    print(f"\n{markdown_table([{k: v for k, v in r.items() if k in COMPACT or '.' in k} for r in flat])}\n"
          f"report: {stem}.md")
    return Published(report=f"{stem}.md", csv=f"{stem}.csv", chart=f"{stem}.svg")
