"""Active Instruction Tuning (Kung et al. 2023, "Active Instruction Tuning: Improving Cross-Task
Generalization by Training on Prompt Sensitive Tasks").

Selection is by task, not by example: the tasks whose prompt the model is most sensitive to are
the ones it has learned least. Algorithm:

  1. Tasks: group the pool by a task key (a field of the examples' ``meta``, e.g. Dolly's
     ``category``, or ``task_key="cluster"``: k-means clusters of the instruction embeddings).
  2. For up to ``instances`` (10) examples of each task, take the model's prediction ``y`` under the
     original instruction (greedy), and ``perturbations`` (10) copies of the instruction with each
     word dropped with probability ``drop_prob`` (0.2).
  3. Prompt uncertainty of an example, with ``p(y | x) = exp(-s(y | x))`` (``s`` the mean token
     cross-entropy of ``y``, the answer loss of the loss engine)::

         u = (1 / K) * sum_k | p(y | perturbed_k) - p(y | original) |

     and of a task, the mean of ``u`` over its probed examples.
  4. Take tasks by uncertainty, highest first, all of each task's examples, until the budget is
     filled (the last task taken in part, in a seeded random order).

``u`` is a ``prompt_uncertainty`` signal of each probed example (its ``raw`` keeps the prediction
and every ``p``), so a second run, with another budget, generates and scores nothing.

Deviations:
- The paper perturbs a task's instruction (its definition, shared by all instances); here every
  example carries its own instruction, and each probed example's instruction is perturbed. A
  "token" is a whitespace-separated word; an Alpaca ``input`` is never perturbed.
- ``target="reference"`` scores the dataset's own answer instead of the model's prediction: no
  generation, so much cheaper, but it measures sensitivity on text the model did not write.
- The model is the embedded SmolLM2-135M-Instruct by default (the paper: T5-based models being
  trained); predictions come from the local chat backend, so ``target="prediction"`` needs the
  chat template.
- Examples without a task key are left out. The paper selects a number of tasks; the budget here
  counts examples.
"""

from __future__ import annotations

import hashlib
import re

import polars as pl
from prefect import flow
from pydantic import Field, model_validator

from sft_select.flows.common import MethodParams, SelectionRef, finish
from sft_select.settings import settings
from sft_select.tasks.backends.loss_engine import Template
from sft_select.tasks.cluster import cluster_kmeans
from sft_select.tasks.signal_task import DatasetRef, SignalRef, get_store
from sft_select.tasks.embed import embed, embed_signal
from sft_select.tasks.lm_loss import Precision
from sft_select.tasks.prompt_uncertainty import Target, probe_uncertainty, prompt_uncertainty_signal
from sft_select.tasks.report import publish_table
from sft_select.tasks.select import resolve_budget


# -- tasks and the task-level rule ----------------------------------------------------------------------------


def draw_order(uids: list[str], seed: int) -> list[str]:
    """A seeded random order that depends on the examples' content only."""
    return [hashlib.sha256(f"{seed}:{u}".encode()).hexdigest() for u in uids]


def select_tasks(tasks: pl.DataFrame, scores: pl.DataFrame, m: int) -> pl.DataFrame:
    """Whole tasks, most uncertain first (ties by task name), until ``m`` examples: ``tasks`` has
    ``uid, task, draw`` (the order inside a task), ``scores`` has ``task, uncertainty, probes``.
    Returns ``uid, score, reason`` with the task's uncertainty as every member's score."""
    ranked = (scores.drop_nulls("uncertainty").sort(["uncertainty", "task"], descending=[True, False])
              .with_columns(task_rank=pl.int_range(1, pl.len() + 1)))
    members = tasks.join(ranked, on="task").sort("task_rank", "draw").head(m)
    reason = pl.format("task '{}': prompt uncertainty {} (task {} of {}, {} probed)", "task",
                       pl.col("uncertainty").round(6), "task_rank", pl.lit(ranked.height), "probes")
    return members.select("uid", score="uncertainty", reason=reason)


class ActiveITParams(MethodParams):
    task_key: str = Field("category", description="What makes a task: a key of the examples' meta (e.g. "
                                                  "category), or 'cluster' for k-means clusters of the "
                                                  "instruction embeddings.")
    clusters: int = Field(100, ge=1, description="Clusters when task_key is 'cluster'.")
    encoder: str | None = Field(None, description="Sentence encoder of the clusters; empty: the configured one.")
    instances: int = Field(10, ge=1, description="Examples probed per task.")
    perturbations: int = Field(10, ge=1, description="Perturbed instructions per probed example.")
    drop_prob: float = Field(0.2, ge=0, le=1, description="Probability of dropping each instruction word.")
    target: Target = Field("prediction", description="prediction: the model's greedy answer to the original "
                                                     "instruction (the paper); reference: the dataset's answer.")
    model: str | None = Field(None, description="Causal LM that predicts and scores; empty: the configured local "
                                                "model.")
    template: Template = Field("chat", description="Prompt format of the scoring (prediction needs chat).")
    max_new_tokens: int = Field(128, ge=1, description="Length of the predictions.")
    max_length: int = Field(1024, ge=16, description="Tokens of prompt + answer when scoring.")
    precision: Precision = Field("float32", description="bfloat16: the losses under bf16 autocast (where this CPU or GPU "
                                                         "runs bf16 fast); int8: dynamically quantised linear layers (CPU; "
                                                         "failed the validation on SmolLM2, docs/results.md).")
    batch_size: int = Field(16, ge=1, description="Probed examples per durable batch.")

    @model_validator(mode="after")
    def _prediction_needs_chat(self) -> ActiveITParams:
        if self.target == "prediction" and self.template != "chat":
            raise ValueError("target='prediction' generates with the chat template, so it scores with it too: "
                             "use template='chat', or target='reference'")
        return self


def task_assignment(dataset: DatasetRef, params: ActiveITParams) -> tuple[pl.DataFrame, list[SignalRef]]:
    """``uid, task, draw`` for the examples that have a task key."""
    refs: list[SignalRef] = []
    if params.task_key == "cluster":
        embedding = embed_signal(params.encoder, field="prompt")
        refs.append(embed(embedding, dataset))
        clusters = cluster_kmeans(embedding, dataset, min(params.clusters, dataset.rows), seed=params.seed)
        tasks = clusters.assignment().select("uid", task=pl.format("cluster {}", "cluster"))
    else:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", params.task_key):
            raise ValueError(f"task_key {params.task_key!r}: a meta key (letters, digits, _) or 'cluster'")
        tasks = dataset.read(["uid", "meta"]).select("uid", task=pl.col("meta").str.json_path_match(
            f"$.{params.task_key}"))
    tasks = tasks.drop_nulls("task")
    return tasks.with_columns(draw=pl.Series(draw_order(tasks["uid"].to_list(), params.seed), dtype=pl.String)), refs


@flow(name="active_it", log_prints=True)
def active_it(params: ActiveITParams) -> SelectionRef:
    """Probe each task's prompt uncertainty; take the most uncertain tasks until the budget is full."""
    dataset = DatasetRef.load(params.dataset, params.dataset_version)
    params = params.model_copy(update={"model": params.model or settings().local_llm})
    m = resolve_budget(params.budget, dataset.rows)

    tasks, signals = task_assignment(dataset, params)
    if tasks.is_empty():
        raise ValueError(f"no example of {dataset.name} has a task key {params.task_key!r} in its meta")
    probes = tasks.filter(pl.col("draw").rank("ordinal").over("task") <= params.instances)
    signal = prompt_uncertainty_signal(params.model, target=params.target, template=params.template,
                                       perturbations=params.perturbations, drop_prob=params.drop_prob,
                                       seed=params.seed, max_new_tokens=params.max_new_tokens,
                                       max_length=params.max_length, precision=params.precision)
    signals.append(probe_uncertainty(signal, dataset, batch_size=params.batch_size, uids=probes["uid"].to_list()))

    values = get_store().signals.values(signal, probes["uid"], alias="u")
    scores = (probes.join(values, on="uid").group_by("task")
              .agg(uncertainty=pl.col("u").mean(), probes=pl.col("u").count())
              .join(tasks.group_by("task").len("examples"), on="task"))
    selection = select_tasks(tasks, scores, m)

    taken = selection.join(tasks, on="uid").group_by("task").len("selected")
    table = (scores.join(taken, on="task", how="left").with_columns(pl.col("selected").fill_null(0))
             .sort("uncertainty", "task", descending=[True, False], nulls_last=True))
    publish_table("active-it-tasks", table.to_dicts(),
                  f"prompt uncertainty per task ({params.task_key}) on {dataset.name}@{dataset.version}")
    print(f"active_it: {selection.height} of {dataset.rows} examples from {taken.height} of {scores.height} tasks "
          f"({params.task_key}); {dataset.rows - tasks.height} examples without a task left out")
    return finish("active_it", params, dataset, selection, signals)
