"""Tree-Instruct against a real local OpenAI-compatible server: the node count is read from the last
line of the judge's answer only, an answer without one there is a stored failure with its raw text,
and a second run asks the server nothing."""

from __future__ import annotations

import re

import pytest
from openai_server import last_user, serving

from sft_select.flows.tree_instruct import TreeInstructParams, tree_instruct
from sft_select.storage import make_example
from sft_select.storage.examples import frame
from sft_select.tasks.judge import llm_signal
from sft_select.tasks.prompts import TREE_INSTRUCT_NODES, parse_node_count

pytestmark = pytest.mark.usefixtures("prefect_api")
JUDGE = "openai:judge-tree"


def answer_for(i: int) -> str:
    """Task i's semantic tree: 3 + i nodes, the count on the last line in several forms; tasks 2 and 7
    give no count on the last line (one states it earlier, one trails off)."""
    tree = "\n".join(["write"] + [f"  node {k}" for k in range(2 + i)])
    if i == 2:
        return f"Nodes: {3 + i}\n{tree}\nThat is the whole tree."
    if i == 7:
        return tree
    last = [f"{3 + i}", f"Total number of nodes: **{3 + i}**", f"Nodes = {3 + i}."][i % 3]
    return f"{tree}\n\n{last}\n"


def judge(request) -> str:
    return answer_for(int(re.search(r'Instruction: "Task (\d+)', last_user(request)).group(1)))


@pytest.fixture
def server(monkeypatch):
    with serving(judge, monkeypatch) as server:
        yield server


def test_the_count_is_read_from_the_last_line_only():
    assert parse_node_count("root\n  a\n  b\n3") == 3
    assert parse_node_count("root\n  a\nThe number of nodes in the tree is 2.\n\n") == 2
    for raw in ("Nodes: 3\nroot\n  a\n  b", "root\n  a", "root\n  node 2", "", "root\n0"):
        with pytest.raises(ValueError):
            parse_node_count(raw)


def test_tree_instruct_keeps_the_most_complex_and_stores_failures(store, server):
    rows = [make_example([{"role": "user", "content": f"Task {i}: do thing {i}"},
                          {"role": "assistant", "content": f"answer {i}"}], instruction=f"Task {i}: do thing {i}",
                         input="" if i % 2 else f"input {i}") for i in range(8)]
    store.datasets.register("tasks", frame(rows))
    uid = {f"Task {i}": r["uid"] for i, r in enumerate(rows)}

    top = tree_instruct(TreeInstructParams(dataset="tasks", judge=JUDGE, budget=3))
    assert server.requests == 8
    body = server.bodies[0]
    assert body["temperature"] == 0 and body["max_tokens"] == TREE_INSTRUCT_NODES.max_tokens
    assert "input " not in last_user(body)  # the instruction alone is parsed, as in the paper

    chosen = store.selections.read(top.selection_id)
    assert chosen["uid"].to_list() == [uid["Task 6"], uid["Task 5"], uid["Task 4"]]  # 9, 8, 7 nodes
    assert chosen["score"].to_list() == [9.0, 8.0, 7.0]
    assert chosen["reason"][0] == "semantic-tree nodes 9.0, rank 1"

    signal = llm_signal(TREE_INSTRUCT_NODES, JUDGE)
    stored = store.signals.read(signal, [r["uid"] for r in rows])
    is_error = stored["error"].is_not_null()
    failed = stored.filter(is_error)
    assert sorted(failed["uid"]) == sorted([uid["Task 2"], uid["Task 7"]])
    for row in failed.iter_rows(named=True):
        assert row["error"].startswith("parse: no node count on the last line") and row["final"]
        assert row["raw"] == answer_for(2 if row["uid"] == uid["Task 2"] else 7)  # the raw text is kept
        assert row["value"] is None  # never defaulted
    assert stored.filter(~is_error)["value"].sort().to_list() == [3.0, 4.0, 6.0, 7.0, 8.0, 9.0]

    again = tree_instruct(TreeInstructParams(dataset="tasks", judge=JUDGE, budget=None, threshold=6))
    assert server.requests == 8  # every count (and every failure) is stored: nothing asked again
    assert store.selections.read(again.selection_id)["score"].to_list() == [9.0, 8.0, 7.0, 6.0]
