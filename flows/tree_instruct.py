"""Tree-Instruct (Zhao et al. 2023, "A Preliminary Study of the Intrinsic Relationship between
Complexity and Alignment"): the complexity measure, and the augmentation that makes instructions harder.

Tree-Instruct measures an instruction's complexity by its semantic tree: an LLM parses the
instruction into a tree (the main action at the root; the objects, attributes, constraints and
sub-tasks it names as nodes below) and the number of nodes is the complexity. The paper adds
3, 6 or 10 nodes to the tree and writes it back as a harder instruction.

0. Augmentation (``add_nodes`` set; otherwise the pool is selected from as it is). For each
   instruction x_i (the first ``limit``), the generator parses x_i into its tree, adds ``add_nodes``
   nodes and writes the enlarged tree back as a new instruction x'_i; the generator then answers x'_i
   (an Alpaca input is kept beside it). Both steps go through ``generate`` (each row stored with its
   provenance, the original's uid as parent; cached; cost cap; dry run), the answered pairs are
   deduplicated against the pool and each other, and registered as the dataset ``output``. The check:
   the judge's node count (step 1) of x'_i and of x_i; an augmented pair whose count grew by less than
   ``min_growth`` (the rewrite did not make it more complex), or could not be counted, is not selected.
1. The judge parses each instruction into a semantic tree and writes the node count ``n_i`` on
   the last line of its answer; ``n_i`` is a stored signal.
2. Keep the instructions with ``n_i >= threshold`` (when one is given), the most complex first,
   to the budget (the top of the pool when no threshold is given).

The parser reads the LAST non-empty line only: an answer that ends without a count there (a tree
cut off by the token limit, a trailing remark) is stored as a failure with its raw text, never read
from elsewhere in the answer or defaulted.

Deviations: the paper uses the tree as a step of rewriting and reports no selection threshold, so
none is applied by default and the budget defaults to 10% of the pool; the node count of the
instruction alone is taken (an Alpaca input is not parsed, as in the paper's rewriting prompt). The
judge is any backend at temperature 0 with our wording (the paper: GPT-4); a multi-turn example is
measured on its last instruction. Augmentation: one prompt does the paper's three steps (tree, expansion,
text) in our wording, greedy; the answers come from the same generator (the paper's responses come from
GPT-4 too); the node-count check (``min_growth``, 1 by default), the near-duplicate step (``dedup_tau``)
and the cost cap (``max_calls``, ``max_tokens``: the generator's calls; the judge's counting is the
selection's) are ours.
"""

from __future__ import annotations

import json

import polars as pl
from prefect import flow
from pydantic import Field

from sft_select.flows.common import MethodParams, SelectionRef, finish
from sft_select.storage import Signal
from sft_select.storage.examples import user_text
from sft_select.tasks.backends.chat import get_llm
from sft_select.tasks.generate import CostCap, Generation, generate, register_generation, requests
from sft_select.tasks.judge import llm_signal, score_with_llm
from sft_select.tasks.prompts import GENERATED_ANSWER, TREE_INSTRUCT_AUGMENT, TREE_INSTRUCT_NODES
from sft_select.tasks.report import histogram_rows, publish_table
from sft_select.tasks.select import resolve_budget, select
from sft_select.tasks.signal_task import DatasetRef, SignalRef, get_store

PAPER_ADDED_NODES = (3, 6, 10)


class TreeInstructParams(MethodParams):
    budget: float | None = Field(
        0.1, description="Keep at most this many of the most complex: a count (>= 1) or a fraction (< 1); empty "
                         "keeps every instruction at or above the threshold.")
    threshold: float | None = Field(
        None, ge=1, description="Keep instructions whose semantic tree has at least this many nodes; empty: none "
                                "(the top of the pool by node count).")
    judge: str | None = Field(None, description="LLM backend: 'openai:<model>' (OPENAI_BASE_URL), 'local', "
                                                "'local:<model folder>'; empty: the configured default.")
    batch_size: int = Field(32, description="Examples per durable batch of judgements (and of generation).")
    add_nodes: int | None = Field(None, ge=1, description="Augmentation: add this many nodes to each instruction's "
                                                          "semantic tree and write it back as a harder instruction "
                                                          "(paper: 3, 6 or 10), answered by the generator; the "
                                                          "selection is then made from these. Empty: no augmentation.")
    generator: str | None = Field(None, description="LLM spec of the generator that rewrites and answers; the "
                                                    "configured default when empty.")
    min_growth: int = Field(1, ge=0, description="An augmented instruction is selected only when its node count "
                                                 "exceeds its original's by at least this (0: no check).")
    limit: int | None = Field(None, ge=1, description="Augment the first this many instructions; empty: all.")
    dedup_tau: float | None = Field(0.9, gt=0, le=1, description="Drop an augmented pair whose cosine similarity to a "
                                                                 "row of the dataset or an earlier pair exceeds this.")
    encoder: str | None = Field(None, description="Sentence encoder of the near-duplicate step.")
    max_calls: int | None = Field(None, ge=1, description="Cost cap: generator calls this run may make.")
    max_tokens: int | None = Field(None, ge=1, description="Cost cap: generator tokens (prompt + completion).")
    output: str | None = Field(None, description="Name of the augmented dataset; default "
                                                 "'<dataset>-tree_instruct-<add_nodes>'.")


def augment(params: TreeInstructParams, dataset: DatasetRef) -> tuple[list[Generation], DatasetRef]:
    """Step 0: rewrite each instruction with ``add_nodes`` more nodes, answer it, register the answered
    pairs (deduplicated against the pool) as the augmented dataset."""
    pool = dataset.read()[: params.limit]
    cap = CostCap(params.max_calls, params.max_tokens)
    generator = get_llm(params.generator)
    reqs = requests([{"instruction": r["instruction"], "nodes": params.add_nodes} for r in pool.iter_rows(named=True)],
                    [[u] for u in pool["uid"]], [{"input": r["input"]} for r in pool.iter_rows(named=True)])
    rewritten = generate(reqs, TREE_INSTRUCT_AUGMENT, generator, method="tree_instruct", pool=None, dedup_tau=None,
                         cap=cap, batch_size=params.batch_size)
    rows = list(rewritten.examples.iter_rows(named=True))
    origin = [json.loads(r["meta"])["generated"] for r in rows]
    answers = requests([{"prompt": user_text(r["instruction"], r["input"])} for r in rows],
                       [g["parents"] for g in origin],
                       [{"instruction": r["instruction"], "input": r["input"], "added_nodes": params.add_nodes,
                         "rewrite": {"signal": g["signal"], "request": g["request"]}} for r, g in zip(rows, origin)])
    answered = generate(answers, GENERATED_ANSWER, generator, method="tree_instruct", pool=pool,
                        dedup_tau=params.dedup_tau, encoder=params.encoder, cap=cap, batch_size=params.batch_size)
    output = params.output or f"{dataset.name}-tree_instruct-{params.add_nodes}"
    ref = register_generation(output, answered, source=f"generated: tree_instruct +{params.add_nodes} nodes of "
                              f"{dataset.name}@{dataset.version} by {answered.report['generator']}")
    for g in (rewritten, answered):
        print(f"tree_instruct augmentation ({g.report['prompt']}): {g.report['requests']} requests -> "
              f"{g.report['generated']} made ({g.report['parse_failures']} unparseable, {g.report['unanswered']} not "
              f"asked) -> {g.report['kept']} kept ({g.report['exact_duplicates']} exact and "
              f"{g.report['near_duplicates']} near duplicates dropped)" + (f"; {g.report['stopped']}"
                                                                           if g.report["stopped"] else ""))
    if ref is None:
        raise ValueError(f"tree_instruct: no augmented pair was kept from {pool.height} instructions "
                         f"({rewritten.report['generated']} rewritten, {answered.report['generated']} answered, "
                         f"{answered.report['exact_duplicates'] + answered.report['near_duplicates']} of those dropped "
                         "as duplicates of the pool; see the signals' errors)")
    return [rewritten, answered], ref


def growth_check(augmented: pl.DataFrame, signal: Signal, original: DatasetRef, params: TreeInstructParams,
                 batch_size: int) -> tuple[pl.DataFrame, SignalRef, dict[str, int]]:
    """The node count of each augmented instruction next to its original's (counted by the same judge):
    ``uid, nodes, original_nodes, growth, passed`` (passed: growth >= ``min_growth``), the original's
    counting, and the counts of the check."""
    parents = [json.loads(m)["generated"]["parents"][0] for m in augmented["meta"]]
    counted = score_with_llm(signal, original, batch_size=batch_size, uids=sorted(set(parents)))
    store = get_store()
    before = store.signals.values(signal, parents, alias="original_nodes")
    after = store.signals.values(signal, augmented["uid"], alias="nodes")
    table = after.with_columns(parent=pl.Series(parents, dtype=pl.String)).join(
        before.rename({"uid": "parent"}).unique("parent"), on="parent", how="left", maintain_order="left")
    table = table.with_columns(growth=pl.col("nodes") - pl.col("original_nodes")).with_columns(
        passed=(pl.col("growth") >= params.min_growth).fill_null(False))
    grown = table["growth"].drop_nulls()
    check = {"augmented": table.height, "reached": int((grown >= params.add_nodes).sum()),
             "grew_less": int(((grown >= 1) & (grown < params.add_nodes)).sum()), "did_not_grow": int((grown < 1).sum()),
             "not_counted": table.height - grown.len(), "passed": int(table["passed"].sum())}
    return table, counted, check


@flow(name="tree_instruct", log_prints=True)
def tree_instruct(params: TreeInstructParams) -> SelectionRef:
    """Count the nodes of each instruction's semantic tree; keep the most complex. With ``add_nodes``, first
    make each instruction harder by that many nodes, answer it, and select from the augmented pairs whose
    node count grew."""
    if params.budget is None and params.threshold is None:
        raise ValueError("tree_instruct needs a budget, a threshold, or both")
    dataset = DatasetRef.load(params.dataset, params.dataset_version)
    judge = get_llm(params.judge)
    signal = llm_signal(TREE_INSTRUCT_NODES, judge)
    params = params.model_copy(update={"judge": signal.model})  # the selection records the judge

    # 0. augmentation: harder instructions, answered, registered; their node growth checked
    generations, original = [], dataset
    if params.add_nodes:
        generations, dataset = augment(params, original)
        budget = params.budget if params.budget is None or params.budget < 1 else min(params.budget, dataset.rows)
        params = params.model_copy(update={"output": dataset.name, "budget": budget})  # the pool is what was made

    counted = score_with_llm(signal, dataset, batch_size=params.batch_size)
    nodes = get_store().signals.values(signal, dataset.read(["uid"])["uid"], alias="score")
    refs = [counted]
    if generations:
        table, before, check = growth_check(dataset.read(), signal, original, params, params.batch_size)
        refs.append(before)
        nodes = nodes.join(table.filter(pl.col("passed")).select("uid"), on="uid", how="semi", maintain_order="left")
        publish_table("tree-instruct-growth", [check], f"node growth of {check['augmented']} instructions augmented by "
                      f"+{params.add_nodes} nodes (counted by {signal.model})")
        print(f"tree_instruct check: of {check['augmented']} augmented, {check['reached']} grew by >= "
              f"{params.add_nodes} nodes, {check['grew_less']} by less, {check['did_not_grow']} did not grow, "
              f"{check['not_counted']} not counted; {check['passed']} pass (growth >= {params.min_growth})")
    m = resolve_budget(params.budget, dataset.rows) if params.budget is not None else None
    selection = select(nodes, m=m, threshold=params.threshold, label="semantic-tree nodes")

    publish_table("tree-instruct-nodes", histogram_rows(nodes["score"], missing="no node count (error)"),
                  f"semantic-tree node counts by {signal.model} on {dataset.name}@{dataset.version}")
    print(f"tree_instruct: {selection.height} of {dataset.rows} kept (node counts by {signal.model}; "
          f"{counted.computed} counted now, {counted.reused} reused, {counted.errors} without a count)")
    refs += [g.signal_ref(dataset.fingerprint) for g in generations]
    return finish("tree_instruct", params, dataset, selection, refs)


__all__ = ["PAPER_ADDED_NODES", "TreeInstructParams", "augment", "growth_check", "tree_instruct"]
