"""compare: the quality Q of each method's selection at one budget, side by side.

The survey judges a selection method pi by the quality of the subset it picks: fine-tune a model
on S_pi(m) and measure it. For one pool D and one budget m:

    for each method run pi (its own parameters) and the baselines:
        S_pi = pi(D, m)                         # the method's own flow, run as a subflow
        M_pi = finetune(base, S_pi, recipe)     # the same base model and recipe for every S
        Q_pi = [evaluate(M_pi, suite) for suite in suites]
    leaderboard: one row per pi, ranked by the first suite's headline metric

Baselines, always in the comparison: random at m, the m longest responses (Zhao et al. 2024) and
(unless ``full_data`` is off) full data, the whole pool (no selection flow runs for it; its
evaluation rows carry the pseudo selection id ``full-<dataset fingerprint>``). The base model
without fine-tuning is evaluated too, as a reference row (``base_row``). Large studies (Xia et al.
2024; Ivison et al. 2025) found that few methods beat random at scale, so every row also shows its
paired difference to random on the same evaluation items, with a 95% interval:
``mean_i(q_i - r_i) +/- 1.96 * sd / sqrt(n)``.

Choices of this flow (not from a paper):
- One budget for everyone: a method's own threshold (a parameter named ``threshold``, e.g.
  AlpaGasus's rating >= 4.5) is switched off unless the run sets it, so each method keeps its m
  best. A method may still return fewer than m (examples it could not score); ``selected`` says so,
  and a method that selects nothing gets a row without a model or metrics.
- The paired intervals treat the evaluation items as the only source of noise; the spread over
  fine-tuning seeds is not measured (one model per selection).
- Every model trains on its examples in uid order, so one fine-tune key always means one
  training run.
- Relative suite paths resolve against ``eval_dir``; the package ships no evaluation data.

Nothing is paid for twice: selections reuse their signals, fine-tuned models are cached on
(selection content, base, recipe) and evaluations on (model, suite, file content), so a second
identical run trains nothing and calls no model; each row says what was computed now.

Outputs: a table artifact (the leaderboard), a markdown artifact with the bar chart (an inline
SVG data URI, which Prefect's UI renders; one panel per suite, baselines in grey, a dashed line at
random) and a markdown report; the same leaderboard
as CSV, the report as Markdown and the chart as SVG under ``<SFT_SELECT_HOME>/reports/``.
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
from prefect import flow
from pydantic import BaseModel, Field, field_validator

from sft_select.flows.common import _key
from sft_select.flows.registry import load_flow, params_model
from sft_select.tasks.core import DatasetRef, get_store
from sft_select.tasks.evaluate import (IFEval, MTBench, PairwiseJudge, ReferenceLoss, Suite, evaluate_task,
                                       model_id)
from sft_select.tasks.finetune import FINISHED, FinetunedRef, Recipe, finetune_key, finetune_task, finetuned_dir
from sft_select.tasks.report import publish_markdown, publish_table
from sft_select.tasks.select import check_budget, resolve_budget

BASELINES = ("random", "longest")  # selection baselines; "full" (the whole pool) is added without a flow
COMPARE_OWNS = {"dataset", "dataset_version", "budget"}  # fields no method run may set

# A short LoRA recipe that finishes on a laptop CPU: one pass, 512 tokens, rank 16.
SHORT_RECIPE = Recipe(epochs=1.0, batch_size=8, max_length=512, lr=2e-4, lora_r=16, lora_alpha=32, save_steps=25)

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
# CLI short names -> suite, and the published file it reads (names as in shared/data/eval)
SUITE_NAMES: dict[str, tuple[type[BaseModel], str]] = {
    "refloss": (ReferenceLoss, "alpaca_eval_805_gpt4turbo.json"),
    "ifeval": (IFEval, "ifeval_541.jsonl"),
    "judge": (PairwiseJudge, "alpaca_eval_805_davinci003.json"),
    "mtbench": (MTBench, "mt_bench_80.jsonl"),
}
MT_BENCH_REFERENCE = "mt_bench_gpt4_reference.jsonl"


class MethodRun(BaseModel):
    """One selection method of the registry with its own parameters."""

    method: str = Field(description="A method of the registry, e.g. random, longest, coreset, alpagasus.")
    params: dict[str, Any] = Field(default_factory=dict, description="The method's other parameters "
                                   "(dataset and budget come from the comparison).")
    label: str | None = Field(None, description="Name of the row (default: the method); needed when one method "
                                                "runs twice with different parameters.")

    @property
    def name(self) -> str:
        return self.label or self.method


class CompareParams(BaseModel):
    """What to compare, on what, and how (the Prefect UI shows it as a form)."""

    dataset: str = Field(description="Name of a dataset registered with `sft-select ingest`.")
    dataset_version: int | None = Field(None, description="Version of the dataset; the latest when empty.")
    budget: float = Field(0.1, description="Examples every method keeps: a count (>= 1) or a fraction (< 1).")
    methods: list[MethodRun] = Field(
        default_factory=lambda: [MethodRun(method="random"), MethodRun(method="longest")],
        description="Method runs; random, longest and full data are always added as baselines.")
    base: str = Field("smollm2-135m-instruct", description="Base model fine-tuned on every selection: an embedded "
                                                           "name, a local folder or a hub id.")
    recipe: Recipe = Field(SHORT_RECIPE, description="The one fine-tuning recipe for every selection.")
    suites: list[Suite] = Field(
        default_factory=lambda: [ReferenceLoss(path=Path(SUITE_NAMES["refloss"][1]), limit=100)], min_length=1,
        description="Evaluation suites; relative paths resolve against eval_dir. Default: reference loss on "
                    "the first 100 AlpacaEval prompts with GPT-4-turbo answers.")
    eval_dir: str | None = Field(None, description="Folder holding the evaluation files (e.g. shared/data/eval).")
    base_row: bool = Field(True, description="Also evaluate the base model without fine-tuning, as a reference.")
    full_data: bool = Field(True, description="Add the full-data baseline: the base fine-tuned on the whole pool "
                                              "(the costliest row; with recipe.max_steps set it trains as many "
                                              "steps as every other row, on a random sample of the pool).")
    seed: int = Field(0, description="Seed of every method that samples (random among them).")

    @field_validator("budget")
    @classmethod
    def _meaningful_budget(cls, budget: float) -> float:
        return check_budget(budget)


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
    trained: bool | None = Field(None, description="fine-tuned in this run (False: the cached model was reused)")
    train_steps: int | None = None
    train_loss: float | None = None
    evaluated: int = Field(0, description="suites computed in this run (the others were reused)")
    train_s: float | None = Field(None, description="wall seconds of the fine-tuning run that finished the model "
                                                    "(a resumed run counts from its restart)")
    eval_s: float | None = Field(None, description="wall seconds of all suites when they ran (None: not recorded)")
    details: list[str] = Field(default_factory=list, description="per-item details of each suite, files under "
                                                                 "<SFT_SELECT_HOME>/evaluations/")


class CompareResult(BaseModel):
    dataset: str
    pool: int
    budget: int
    rows: list[LeaderboardRow]
    report: str = Field(description="Markdown report, under <SFT_SELECT_HOME>/reports/")
    csv: str
    chart: str


@flow(name="compare", log_prints=True)
def compare(params: CompareParams) -> CompareResult:
    """Select with every method at one budget, fine-tune the same base on each selection, evaluate
    every model with every suite, and publish the leaderboard."""
    dataset = DatasetRef.load(params.dataset, params.dataset_version)
    m = resolve_budget(params.budget, dataset.rows)
    suites = [resolve_suite(s, params.eval_dir) for s in params.suites]  # fail before any work
    runs = [(run, method_params(run, params)) for run in with_baselines(params.methods)]

    # 1. select: every method's own flow at budget m
    pool = dataset.read()
    entries: list[tuple[str, str, str, pl.DataFrame]] = []  # (row name, kind, selection id, examples)
    for run, run_params in runs:
        ref = load_flow(run.method)(run_params)
        uids = get_store().selections.read(ref.selection_id)["uid"]
        kind = "baseline" if run.method in BASELINES else "method"
        entries.append((run.name, kind, ref.selection_id, pool.join(uids.to_frame(), on="uid", how="semi")))
    if params.full_data:
        entries.append(("full", "baseline", f"full-{dataset.fingerprint[:12]}", pool))

    # 2. fine-tune the same base with the same recipe on each selection; 3. evaluate every model
    rows: list[LeaderboardRow] = []
    for name, kind, selection_id, examples in entries:
        if examples.is_empty():  # e.g. a judge whose every answer failed to parse: a row without a model
            print(f"{name}: selected nothing, so nothing to fine-tune or evaluate")
            rows.append(LeaderboardRow(method=name, kind=kind, selection_id=selection_id, selected=0, model="",
                                       metrics={}))
            continue
        examples = examples.sort("uid")  # one order per content: one fine-tune key, one training run
        cached = (finetuned_dir(finetune_key(examples, params.base, params.recipe)) / FINISHED).exists()
        tune = finetune_task.with_options(task_run_name=f"fine-tune[{name}]")
        model = tune(examples, params.base, params.recipe)
        rows.append(leaderboard_row(name, kind, selection_id, examples.height, model, suites, trained=not cached))
        print(f"{name}: {examples.height} examples, model {model.key} ({'reused' if cached else 'trained'})")
    if params.base_row:
        rows.append(leaderboard_row("base (not fine-tuned)", "reference", None, None, params.base, suites))

    rows = rank(paired_to_random(rows, suites), suites)
    return publish(params, dataset, m, suites, rows)


# -- parameters ----------------------------------------------------------------------------------


def with_baselines(methods: list[MethodRun]) -> list[MethodRun]:
    """The runs to compare: the baselines first (unless a run of them is listed), then the methods."""
    runs = [MethodRun(method=b) for b in BASELINES if b not in {r.method for r in methods}] + list(methods)
    names = [r.name for r in runs]
    if "full" in names or len(set(names)) != len(names):
        raise ValueError(f"method rows need unique names other than 'full' (got {names}): give each run a label")
    return runs


def method_params(run: MethodRun, params: CompareParams) -> BaseModel:
    """The method's parameter model at the comparison's dataset, budget and seed; unknown fields and
    fields the comparison owns are errors, and an unset ``threshold`` is switched off (one budget)."""
    model = params_model(load_flow(run.method))
    owned = COMPARE_OWNS & set(run.params)
    unknown = set(run.params) - set(model.model_fields)
    if owned or unknown:
        raise ValueError(f"{run.name}: " + "; ".join(
            ([f"{sorted(owned)} are set by the comparison"] if owned else [])
            + ([f"unknown parameters {sorted(unknown)} (known: {sorted(model.model_fields)})"] if unknown else [])))
    values = {"seed": params.seed, **run.params, "dataset": params.dataset,
              "dataset_version": params.dataset_version, "budget": params.budget}
    if "threshold" in model.model_fields and "threshold" not in run.params:
        values["threshold"] = None
    return model(**values)


def resolve_suite(suite: Suite, eval_dir: str | None) -> Suite:
    """The suite with its relative file paths resolved against ``eval_dir`` (else the working folder);
    a missing file is an error naming it."""
    update = {}
    for field in ("path", "reference_path"):
        path = getattr(suite, field, None)
        if path is None:
            continue
        full = Path(path).expanduser()
        if not full.is_absolute() and eval_dir:
            full = Path(eval_dir).expanduser() / full
        if not full.is_file():
            raise FileNotFoundError(f"{suite.suite}: evaluation file {full} not found; "
                                    + ("" if eval_dir else "set eval_dir (--eval-dir) to the folder that holds it or ")
                                    + "give the file's full path")
        update[field] = full.resolve()
    return suite.model_copy(update=update)


def suite_from_name(spec: str, *, limit: int | None = None, judge: str | None = None,
                    max_new_tokens: int | None = None) -> Suite:
    """A suite from a CLI short name, ``refloss``, ``ifeval``, ``judge`` or ``mtbench``, optionally
    ``NAME=PATH``; without a path it reads the published file of that name (resolved against
    ``eval_dir`` by the flow): AlpacaEval with GPT-4-turbo answers for ``refloss``, IFEval's 541
    prompts, AlpacaEval with text-davinci-003 references for ``judge`` (AlpacaEval 1's reference),
    MT-Bench's 80 questions with GPT-4 reference answers for ``mtbench``."""
    name, _, path = spec.partition("=")
    if name not in SUITE_NAMES:
        raise ValueError(f"unknown suite {name!r}; suites: {', '.join(SUITE_NAMES)}")
    cls, default_file = SUITE_NAMES[name]
    values: dict[str, Any] = {"path": Path(path).expanduser().resolve() if path else Path(default_file),
                              "limit": limit}
    if cls is not ReferenceLoss and max_new_tokens:
        values["max_new_tokens"] = max_new_tokens
    if cls in (PairwiseJudge, MTBench):
        values["judge"] = judge
    if cls is MTBench:
        values["reference_path"] = Path(MT_BENCH_REFERENCE) if not path else None
    return cls(**values)


# -- the leaderboard -------------------------------------------------------------------------------


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
                    model: FinetunedRef | str, suites: list[Suite], trained: bool | None = None) -> LeaderboardRow:
    """Evaluate ``model`` with every suite (each result reused when it exists)."""
    metrics: dict[str, float] = {}
    evaluated, details, seconds = 0, [], []
    for suite in suites:
        run = evaluate_task.with_options(task_run_name=f"evaluate[{name}: {suite.suite}]")
        ref = run(model, suite, selection_id)
        evaluated += not ref.reused
        metrics.update({f"{suite_name(suite, suites)}.{k}": v for k, v in ref.metrics.items()})
        details.append(ref.details)
        seconds.append(ref.seconds)
    tuned = model if isinstance(model, FinetunedRef) else None
    return LeaderboardRow(method=name, kind=kind, selection_id=selection_id, selected=selected, model=model_id(model),
                          metrics=metrics, trained=trained, train_steps=tuned and tuned.steps,
                          train_loss=tuned and tuned.train_loss, evaluated=evaluated, details=details,
                          train_s=tuned and tuned.runtime_s,
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
    folder = get_store().home / "evaluations"
    random_row = next((r for r in rows if r.method == "random" and r.details), None)
    if random_row is None:
        return rows
    out = []
    for row in rows:
        diffs = {}
        if row is not random_row and row.details:
            for i, suite in enumerate(suites):
                ours, theirs = (pl.read_parquet(folder / r.details[i]) for r in (row, random_row))
                diffs[headline(suite, suites)[0]] = paired_difference(ours, theirs, suite.suite)
        out.append(row.model_copy(update={"vs_random": diffs}))
    return out


def rank(rows: list[LeaderboardRow], suites: list[Suite]) -> list[LeaderboardRow]:
    """Best first by the first suite's headline metric (rows without a value last)."""
    column, higher = headline(suites[0], suites)

    def key(row: LeaderboardRow) -> tuple[bool, float]:
        v = row.metrics.get(column, math.nan)
        return (math.isnan(v), -v if higher else v)

    return sorted(rows, key=key)


def table_rows(rows: list[LeaderboardRow], suites: list[Suite]) -> list[dict[str, Any]]:
    """The leaderboard as flat rows (table artifact, CSV)."""
    out = []
    metrics = list(dict.fromkeys(k for r in rows for k in r.metrics))
    for i, r in enumerate(rows):
        row: dict[str, Any] = {"rank": i + 1, "method": r.method, "kind": r.kind, "selected": r.selected}
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


def _round(v: float | None) -> float | None:
    return None if v is None else v if math.isnan(v) else round(v, 4)


# -- the chart and the report --------------------------------------------------------------------

COMPACT = ("rank", "method", "kind", "selected", "fine-tune")
COLOURS = {"method": "#2563eb", "baseline": "#9ca3af", "reference": "#ffffff"}


def bar_chart_svg(rows: list[LeaderboardRow], suites: list[Suite]) -> str:
    """Horizontal bars, one panel per suite's headline metric: methods blue, baselines grey, the
    base model white, a dashed line at random's value; the value is printed at each bar. An axis
    that does not start at zero says so."""
    width, label_w, bar_h, gap = 720, 240, 18, 6
    plot_w = width - label_w - 80
    parts, y = [], 10
    for suite in suites:
        column, higher = headline(suite, suites)
        values = [r.metrics.get(column, math.nan) for r in rows]
        finite = [v for v in values if not math.isnan(v)] or [0.0]
        lo, hi = min(0.0, min(finite)), max(finite) or 1.0
        span = max(finite) - min(finite)
        if min(finite) > 0 and 0 < span < 0.2 * hi:  # close values: start the axis near them
            lo = min(finite) - span

        def x(v: float, lo: float = lo, hi: float = hi) -> float:
            return label_w + max(1.0, plot_w * (v - lo) / ((hi - lo) or 1.0))

        parts.append(f'<text x="10" y="{y + 14}" font-size="14" font-weight="bold">{html.escape(column)} '
                     f'({"higher" if higher else "lower"} is better)</text>')
        y += 24
        top = y
        for r, v in zip(rows, values):
            label = r.method + (" (baseline)" if r.kind == "baseline" else "")
            parts.append(f'<text x="{label_w - 8}" y="{y + 13}" font-size="12" text-anchor="end">'
                         f'{html.escape(label)}</text>')
            if math.isnan(v):
                parts.append(f'<text x="{label_w + 4}" y="{y + 13}" font-size="12">n/a</text>')
            else:
                parts.append(f'<rect x="{label_w}" y="{y}" width="{x(v) - label_w:.1f}" height="{bar_h}" '
                             f'fill="{COLOURS[r.kind]}" stroke="#374151" stroke-width="0.5"/>')
                parts.append(f'<text x="{x(v) + 4:.1f}" y="{y + 13}" font-size="12">{v:.4g}</text>')
            y += bar_h + gap
        random_value = next((v for r, v in zip(rows, values) if r.method == "random" and not math.isnan(v)), None)
        if random_value is not None:
            parts.append(f'<line x1="{x(random_value):.1f}" x2="{x(random_value):.1f}" y1="{top - 4}" y2="{y - 2}" '
                         'stroke="#111827" stroke-dasharray="4 3"/>')
        parts.append(f'<text x="{label_w}" y="{y + 10}" font-size="10" fill="#6b7280">axis from {lo:.4g}'
                     f'{"" if lo == 0 else " (not zero)"} to {hi:.4g}; dashed: random</text>')
        y += 28
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y}" font-family="sans-serif">'
            f'<rect width="100%" height="100%" fill="#ffffff"/>{"".join(parts)}</svg>')


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join("" if row[c] is None else str(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def report_markdown(params: CompareParams, where: str, pool: int, m: int, suites: list[Suite],
                    rows: list[LeaderboardRow], chart: str) -> str:
    """The markdown report: what was compared, the chart, the leaderboard, what this run computed."""
    trained, evaluated = sum(bool(r.trained) for r in rows), sum(r.evaluated for r in rows)
    flat, heads = table_rows(rows, suites), {headline(s, suites)[0] for s in suites}
    setup = params.model_dump(mode="json") | {"suites": [s.model_dump(mode="json") for s in suites]}
    return "\n".join([
        f"# Selection methods compared on `{where}`: {m} of {pool} examples each",
        "",
        f"Every selection fine-tunes `{params.base}` with the same recipe; rows are ranked by "
        f"`{headline(suites[0], suites)[0]}`. Baselines: random and longest at the same budget, and full data "
        f"({pool} examples). *vs random*: the mean paired difference to the random baseline's model on the same "
        "items, with a 95% interval; an interval that holds 0 is no evidence of a difference.",
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


def publish(params: CompareParams, dataset: DatasetRef, m: int, suites: list[Suite],
            rows: list[LeaderboardRow]) -> CompareResult:
    """The leaderboard as a table artifact, the chart and the report as markdown artifacts (the
    chart inline, as an SVG data URI), and the same under ``<SFT_SELECT_HOME>/reports/`` as CSV,
    SVG and Markdown (one name per set of parameters, rewritten by a re-run)."""
    where = f"{dataset.name}@{dataset.version}"
    flat = table_rows(rows, suites)
    svg = bar_chart_svg(rows, suites)
    image = f"![leaderboard](data:image/svg+xml;base64,{base64.b64encode(svg.encode()).decode()})"
    run_key = hashlib.sha256(params.model_dump_json().encode()).hexdigest()[:10]
    stem = get_store().home / "reports" / f"compare-{dataset.name}-v{dataset.version}-{run_key}"
    stem.parent.mkdir(parents=True, exist_ok=True)

    Path(f"{stem}.svg").write_text(svg, encoding="utf-8")
    Path(f"{stem}.md").write_text(report_markdown(params, where, dataset.rows, m, suites, rows,
                                                  f"![leaderboard]({stem.name}.svg)"), encoding="utf-8")
    pl.DataFrame(flat).write_csv(f"{stem}.csv")
    publish_table(_key("compare", dataset.name, "leaderboard"), flat, f"methods on {where} at budget {m}")
    publish_markdown(_key("compare", dataset.name, "chart"), image, f"headline metrics on {where} at budget {m}")
    publish_markdown(_key("compare", dataset.name, "report"),
                     report_markdown(params, where, dataset.rows, m, suites, rows, image),
                     f"comparison report, {where}, budget {m}")
    print(f"\n{markdown_table([{k: v for k, v in r.items() if k in COMPACT or '.' in k} for r in flat])}\n"
          f"report: {stem}.md")
    return CompareResult(dataset=where, pool=dataset.rows, budget=m, rows=rows, report=f"{stem}.md",
                         csv=f"{stem}.csv", chart=f"{stem}.svg")

if __name__ == "__main__":
    import sys

    compare(CompareParams(dataset=sys.argv[1], eval_dir=sys.argv[2] if len(sys.argv) > 2 else None))
