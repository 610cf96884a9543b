"""Tree-Instruct against a real local OpenAI-compatible server: the node count is read from the last
line of the judge's answer only, an answer without one there is a stored failure with its raw text,
and a second run asks the server nothing."""

from __future__ import annotations

import json
import re

import polars as pl
import pytest
from openai_server import last_user, serving

from sft_select.flows.tree_instruct import TreeInstructParams, tree_instruct
from sft_select.storage import make_example
from sft_select.storage.examples import frame
from sft_select.tasks.generate import provenance
from sft_select.tasks.judge import llm_signal
from sft_select.tasks.prompts import TREE_INSTRUCT_NODES, parse_new_instruction, parse_node_count
from sft_select.tasks.signal_task import DatasetRef

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


EXTRA = ["quickly", "politely", "briefly", "carefully", "twice", "today"]  # one node each


def augmenting(request) -> str:
    """The generator and the judge on one server: task 0 gains all 6 new nodes, task 3 gains 2, task 1 comes back
    unchanged (its count does not grow), task 2's rewrite has no "New instruction:" section. The judge counts one
    node a word."""
    text, system = last_user(request), request["messages"][0]["content"]
    if "New instruction:" in text:
        original = re.search(r'Instruction: "(.*)"', text).group(1)
        i = int(re.search(r"Task (\d+)", original).group(1))
        added = {0: EXTRA, 1: [], 3: EXTRA[:2]}.get(i)
        return "write\n  thing\n+ more" + ("" if added is None else f"\n\nNew instruction: {' '.join([original, *added])}")
    if system.startswith("You are a helpful"):
        return f"Here is how: {text}"
    instruction = re.search(r'Instruction: "(.*)"', text).group(1)
    return f"tree\n{len(instruction.split())}"


def test_augmentation_adds_nodes_answers_and_selects_only_what_grew(store, monkeypatch):
    assert json.loads(parse_new_instruction('tree\nHere is the new instruction:\n\n"Do X and Y."\n\nA remark.')) == {
        "instruction": "Do X and Y."}  # its first paragraph, as small models write it
    rows = [make_example([{"role": "user", "content": f"Task {i}: do thing {i}"},
                          {"role": "assistant", "content": f"answer {i}"}], instruction=f"Task {i}: do thing {i}")
            for i in range(4)]
    store.datasets.register("plain", frame(rows))
    with serving(augmenting, monkeypatch) as server:
        params = TreeInstructParams(dataset="plain", judge=JUDGE, generator="openai:gen-tree", add_nodes=6,
                                    budget=3, dedup_tau=None)
        ref = tree_instruct(params)
        assert server.requests == 4 + 3 + 3 + 3  # rewrites, answers of the 3 parsed, counts of those and of parents
        augmented = DatasetRef.load("plain-tree_instruct-6").read()
        rows_of = provenance(augmented)
        assert augmented.height == 3 and set(rows_of["method"]) == {"tree_instruct"}
        by_instruction = dict(zip(augmented["instruction"], rows_of["parents"].to_list()))
        assert by_instruction["Task 0: do thing 0 " + " ".join(EXTRA)] == [rows[0]["uid"]]
        assert set(rows_of["prompt"]) == {"generated_answer"}
        fields = json.loads(augmented["meta"][0])["fields"]
        assert fields["added_nodes"] == 6 and fields["rewrite"]["signal"].startswith("tree_instruct_augment")
        assert augmented.filter(pl.col("instruction").str.starts_with("Task 0"))["output"][0].startswith("Here is how:")

        # the check: task 1 did not grow (5 -> 5 nodes) and is not selected; 0 grew by 6, 3 by 2
        chosen = store.selections.read(ref.selection_id).join(augmented, on="uid")
        assert [s.split(":")[0] for s in chosen["instruction"]] == ["Task 0", "Task 3"]
        assert chosen["score"].to_list() == [5.0 + 6, 5.0 + 2]
        assert tree_instruct(params).rows == 2 and server.requests == 13  # a second run asks nothing
