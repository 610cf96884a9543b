"""The generate task against a real loopback OpenAI-compatible server: every row keeps its provenance, a
second run asks nothing, a killed run resumes with only the missing requests, the cost cap stops cleanly
with what was made, duplicates of the pool are dropped and counted, and a dry run plans without calling."""

from __future__ import annotations

import json
import os
import re
import signal as signals
import subprocess
import sys
import time

import polars as pl
import pytest
from openai_server import last_user, serving
from typer.testing import CliRunner

from sft_select.flows.cli import app
from sft_select.storage import NotFilled, make_example
from sft_select.storage.examples import frame
from sft_select.tasks.generate import CostCap, generate, provenance, register_generation, requests, text_id
from sft_select.tasks.prompts import TEGIT_TASK
from sft_select.tasks.signal_task import dry_run

GEN = "openai:generator"


def task_for(request) -> str:
    """Document i becomes the task "Summarise fact i"; document 3's answer has no output section."""
    i = int(re.search(r"Fact number (\d+)\.", last_user(request)).group(1))
    if i == 3:
        return "Instruction: Summarise fact 3\nInput: none"
    return f"Instruction: Summarise fact {i}\nInput: none\nOutput: Fact {i} is about the number {i}."


def documents(n: int) -> list[str]:
    return [f"Fact number {i}. The number {i} is written with the digit {i}." for i in range(n)]


def doc_requests(docs: list[str]):
    return requests([{"document": d} for d in docs], [[text_id(d)] for d in docs])


def test_rows_carry_provenance_a_second_run_asks_nothing_and_the_dataset_shows_where_it_came_from(store, monkeypatch):
    docs = documents(6)
    with serving(task_for, monkeypatch) as server:
        made = generate(doc_requests(docs), TEGIT_TASK, GEN, method="tegit", round=1, dedup_tau=None, batch_size=4)
        assert server.requests == 6
        assert made.report["generated"] == 5 and made.report["parse_failures"] == 1 and made.report["kept"] == 5
        again = generate(doc_requests(docs), TEGIT_TASK, GEN, method="tegit", round=1, dedup_tau=None)
        assert server.requests == 6 and again.report["computed"] == 0 and again.report["reused"] == 6
    assert again.examples["uid"].to_list() == made.examples["uid"].to_list()

    stored = store.signals.read(made.signal)
    failed = stored.filter(stored["error"].is_not_null())
    assert failed.height == 1 and failed["raw"][0].startswith("Instruction: Summarise fact 3")
    assert failed["error"][0].startswith("parse: no output section") and failed["final"][0]
    rows = provenance(made.examples)
    assert rows.height == 5 and set(rows["method"]) == {"tegit"} and set(rows["round"]) == {1}
    assert set(rows["prompt"]) == {"tegit_task"} and set(rows["prompt_version"]) == {"1"}
    assert all(g.startswith(GEN + "@127.0.0.1") for g in rows["generator"]) and set(rows["signal"]) == {made.signal.id}
    by_instruction = dict(zip(made.examples["instruction"], rows["parents"].to_list()))
    assert by_instruction["Summarise fact 4"] == [text_id(docs[4])]
    assert set(made.examples["source"]) == {"generated:tegit"}

    pool = frame([make_example([{"role": "user", "content": "seed"}, {"role": "assistant", "content": "row"}])])
    ref = register_generation("facts-tegit", made, extra=pool)
    assert ref.rows == 6 and ref.version == 1
    assert register_generation("facts-tegit", again, extra=pool).version == 1  # same content: same version
    listed = CliRunner().invoke(app, ["datasets"])
    assert listed.exit_code == 0 and "generated: tegit round 1" in listed.output
    shown = CliRunner().invoke(app, ["datasets", "--provenance", "facts-tegit"])
    assert shown.exit_code == 0 and "tegit_task" in shown.output
    assert "5 generated rows, 1 given rows, of 6" in shown.output


def test_the_cost_cap_stops_cleanly_with_what_was_made_and_a_higher_cap_pays_only_for_the_rest(store, monkeypatch):
    docs = [d for i, d in enumerate(documents(9)) if i != 3]  # 8 documents, every answer parses
    with serving(task_for, monkeypatch) as server:
        capped = generate(doc_requests(docs), TEGIT_TASK, GEN, method="tegit", dedup_tau=None, batch_size=2,
                          cap=CostCap(max_calls=3))
        assert server.requests == 3 and capped.report["kept"] == 3
        assert capped.report["stopped"] == "cost cap reached: 3 calls of max_calls=3"
        assert register_generation("capped", capped).rows == 3  # what was made so far is a dataset
        # a token cap: checked before each batch, so the batch that crosses it is the last
        tokens = generate(doc_requests(docs), TEGIT_TASK, GEN, method="tegit", dedup_tau=None, batch_size=2,
                          cap=CostCap(max_tokens=1))
        assert server.requests == 5 and tokens.report["stopped"].startswith("cost cap reached:")
        assert tokens.report["kept"] == 5 and tokens.report["unanswered"] == 3
        rest = generate(doc_requests(docs), TEGIT_TASK, GEN, method="tegit", dedup_tau=None, batch_size=2)
        assert server.requests == 8 and rest.report["computed"] == 3 and rest.report["stopped"] is None


def test_exact_and_near_duplicates_of_the_pool_and_of_each_other_are_dropped_and_counted(store, monkeypatch):
    def answer(request) -> str:
        i = int(re.search(r"Fact number (\d+)\.", last_user(request)).group(1))
        if i in (1, 2):  # the same task from two documents: one is an exact duplicate of the other
            return "Instruction: Name the largest planet.\nInput: none\nOutput: Jupiter is the largest planet."
        if i == 4:  # the pool's example with different punctuation: a near duplicate
            return "Instruction: What is the boiling point of water at sea level\nInput: none\nOutput: 100 degrees C"
        if i == 5:  # the pool's example exactly
            return "Instruction: Give the capital of France.\nInput: none\nOutput: Paris is the capital of France."
        return {0: "Instruction: Explain photosynthesis.\nInput: none\nOutput: Plants turn light into sugar.",
                3: "Instruction: Write a haiku about the sea.\nInput: none\nOutput: Grey waves fold to foam."}[i]

    pool = frame([make_example([{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in [
        ("Give the capital of France.", "Paris is the capital of France."),
        ("What is the boiling point of water at sea level?", "100 degrees C.")]])
    with serving(answer, monkeypatch) as server:
        made = generate(doc_requests(documents(6)), TEGIT_TASK, GEN, method="tegit", pool=pool, dedup_tau=0.95)
        assert server.requests == 6
    assert made.report["generated"] == 6 and made.report["exact_duplicates"] == 2
    assert made.report["near_duplicates"] == 1 and made.report["kept"] == 3
    assert sorted(made.examples["instruction"]) == ["Explain photosynthesis.", "Name the largest planet.",
                                                    "Write a haiku about the sea."]


def test_a_dry_run_counts_calls_and_tokens_and_calls_nothing(store, monkeypatch):
    with serving(task_for, monkeypatch) as server, dry_run() as plan:
        with pytest.raises(NotFilled):
            generate(doc_requests(documents(4)), TEGIT_TASK, GEN, method="tegit", dedup_tau=None)
        assert server.requests == 0
    [row] = plan.rows
    assert row["to_compute"] == 4 and row["calls"] == 4 and row["tokens (est.)"] > 4 * TEGIT_TASK.max_tokens


_CHILD = """
import sys
from sft_select.tasks.generate import generate, requests, text_id
from sft_select.tasks.prompts import TEGIT_TASK
docs = [f"Fact number {i}. The number {i} is written with the digit {i}." for i in range(int(sys.argv[1]))]
reqs = requests([{"document": d} for d in docs], [[text_id(d)] for d in docs])
generate(reqs, TEGIT_TASK, "openai:generator", method="tegit", dedup_tau=None, batch_size=2)
"""


def test_a_killed_generation_resumes_and_pays_only_for_the_missing_requests(store, monkeypatch):
    n = 10
    with serving(task_for, monkeypatch, latency_s=0.4) as server:
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(n)], env=dict(os.environ),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        parts = store.home / "signals"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(parts.glob("tegit_task.*/part-*.parquet"))) < 2:
            time.sleep(0.05)
        child.send_signal(signals.SIGKILL)
        child.wait()
        [folder] = parts.glob("tegit_task.*")
        stored = pl.read_parquet(list(folder.glob("part-*.parquet")))["uid"].n_unique()
        assert 2 <= stored < n, "the kill should land mid-generation"
        before = server.requests
        made = generate(doc_requests(documents(n)), TEGIT_TASK, GEN, method="tegit", dedup_tau=None, batch_size=2)
        assert server.requests - before == n - stored  # only the requests without a stored answer
        assert made.report["computed"] == n - stored and made.report["kept"] == n - 1  # document 3 does not parse
    assert json.loads(made.examples["meta"][0])["generated"]["method"] == "tegit"
