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
- Every model trains on its examples in uid order (``finetune`` sorts them), so one fine-tune key
  always means one training run.
- Relative suite paths resolve against ``eval_dir``; the package ships no evaluation data.

Nothing is paid for twice: selections reuse their signals, fine-tuned models are cached on
(selection content, base, recipe) and evaluations on (model, suite, file content), so a second
identical run trains nothing and calls no model; each row says what was computed now.

Outputs (``tasks/leaderboard.py``): a table artifact (the leaderboard), a markdown artifact with
the chart of each row's paired difference to random and its 95% interval (an inline SVG data URI,
which Prefect's UI renders; one panel per suite) and a markdown report; the same leaderboard as
CSV, the report as Markdown and the chart as SVG under ``<SFT_SELECT_HOME>/reports/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sft_select.flows.common import _key
from sft_select.flows.registry import load_flow, params_model
from sft_select.tasks.signal_task import DatasetRef, get_store
from sft_select.tasks.evaluate import (IFEval, MTBench, PairwiseJudge, ReferenceLoss, Suite, evaluate_all,
                                       tune_and_evaluate)
from sft_select.tasks.finetune import Recipe
from sft_select.tasks.leaderboard import LeaderboardRow, leaderboard_row, paired_to_random, publish, rank
from sft_select.tasks.select import check_budget, resolve_budget

BASELINES = ("random", "longest")  # selection baselines; "full" (the whole pool) is added without a flow
COMPARE_OWNS = {"dataset", "dataset_version", "budget"}  # fields no method run may set

# A short LoRA recipe that finishes on a laptop CPU: one pass, 512 tokens, rank 16.
SHORT_RECIPE = Recipe(epochs=1.0, batch_size=8, max_length=512, lr=2e-4, lora_r=16, lora_alpha=32, save_steps=25)

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

    model_config = ConfigDict(extra="forbid")

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

    model_config = ConfigDict(extra="forbid")

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
        tuned = tune_and_evaluate(examples, params.base, params.recipe, suites, selection_id=selection_id, name=name)
        rows.append(leaderboard_row(name, kind, selection_id, examples.height, tuned.model, tuned.evaluations, suites,
                                    trained=tuned.trained))
        print(f"{name}: {examples.height} examples, model {tuned.model.key} "
              f"({'trained' if tuned.trained else 'reused'})")
    if params.base_row:
        name = "base (not fine-tuned)"
        rows.append(leaderboard_row(name, "reference", None, None, params.base,
                                    evaluate_all(params.base, suites, name=name), suites))

    rows = rank(paired_to_random(rows, suites), suites)
    setup = params.model_dump(mode="json") | {"suites": [s.model_dump(mode="json") for s in suites]}
    out = publish(setup, dataset.name, dataset.version, dataset.rows, m, suites, rows, _key("compare", dataset.name))
    return CompareResult(dataset=f"{dataset.name}@{dataset.version}", pool=dataset.rows, budget=m, rows=rows,
                         report=out.report, csv=out.csv, chart=out.chart)


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
    fields the comparison owns are errors, an unset ``threshold`` is switched off (one budget), and a
    selection short of the budget through failed examples is accepted (its row shows the count)."""
    model = params_model(load_flow(run.method))
    owned = COMPARE_OWNS & set(run.params)
    unknown = set(run.params) - set(model.model_fields)
    if owned or unknown:
        raise ValueError(f"{run.name}: " + "; ".join(
            ([f"{sorted(owned)} are set by the comparison"] if owned else [])
            + ([f"unknown parameters {sorted(unknown)} (known: {sorted(model.model_fields)})"] if unknown else [])))
    # a row whose method kept fewer than the budget (its examples failed) shows that in its `selected`
    values = {"seed": params.seed, "allow_partial": True, **run.params, "dataset": params.dataset,
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
