"""Tree-Instruct (Zhao et al. 2023, "A Preliminary Study of the Intrinsic Relationship between
Complexity and Alignment"), the complexity half.

Tree-Instruct measures an instruction's complexity by its semantic tree: an LLM parses the
instruction into a tree (the main action at the root; the objects, attributes, constraints and
sub-tasks it names as nodes below) and the number of nodes is the complexity. The paper then adds
3, 6 or 10 nodes to the tree and writes it back as a harder instruction (the generation half, a later
issue; a pool it writes is registered as a dataset and selected from by this same flow).

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
measured on its last instruction.
"""

from __future__ import annotations

from prefect import flow
from pydantic import Field

from sft_select.flows.common import MethodParams, SelectionRef, finish
from sft_select.tasks.backends.chat import get_llm
from sft_select.tasks.judge import llm_signal, score_with_llm
from sft_select.tasks.prompts import TREE_INSTRUCT_NODES
from sft_select.tasks.report import histogram_rows, publish_table
from sft_select.tasks.select import resolve_budget, select
from sft_select.tasks.signal_task import DatasetRef, get_store


class TreeInstructParams(MethodParams):
    budget: float | None = Field(
        0.1, description="Keep at most this many of the most complex: a count (>= 1) or a fraction (< 1); empty "
                         "keeps every instruction at or above the threshold.")
    threshold: float | None = Field(
        None, ge=1, description="Keep instructions whose semantic tree has at least this many nodes; empty: none "
                                "(the top of the pool by node count).")
    judge: str | None = Field(None, description="LLM backend: 'openai:<model>' (OPENAI_BASE_URL), 'local', "
                                                "'local:<model folder>'; empty: the configured default.")
    batch_size: int = Field(32, description="Examples per durable batch of judgements.")


@flow(name="tree_instruct", log_prints=True)
def tree_instruct(params: TreeInstructParams) -> SelectionRef:
    """Count the nodes of each instruction's semantic tree; keep the most complex."""
    if params.budget is None and params.threshold is None:
        raise ValueError("tree_instruct needs a budget, a threshold, or both")
    dataset = DatasetRef.load(params.dataset, params.dataset_version)
    judge = get_llm(params.judge)
    signal = llm_signal(TREE_INSTRUCT_NODES, judge)
    params = params.model_copy(update={"judge": signal.model})  # the selection records the judge

    counted = score_with_llm(signal, dataset, batch_size=params.batch_size)
    nodes = get_store().signals.values(signal, dataset.read(["uid"])["uid"], alias="score")
    m = resolve_budget(params.budget, dataset.rows) if params.budget is not None else None
    selection = select(nodes, m=m, threshold=params.threshold, label="semantic-tree nodes")

    publish_table("tree-instruct-nodes", histogram_rows(nodes["score"], missing="no node count (error)"),
                  f"semantic-tree node counts by {signal.model} on {dataset.name}@{dataset.version}")
    print(f"tree_instruct: {selection.height} of {dataset.rows} kept (node counts by {signal.model}; "
          f"{counted.computed} counted now, {counted.reused} reused, {counted.errors} without a count)")
    return finish("tree_instruct", params, dataset, selection, [counted])
