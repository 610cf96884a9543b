"""TEGIT on a real loopback OpenAI-compatible server: tasks from documents with their provenance, the
discriminator's accept/reject kept with its reason (undecided answers recorded), the selection is
exactly the accepted tasks, and the optional fine-tuned generator (a tiny Llama) writes round 2 under
its own identity."""

from __future__ import annotations

import json
import re

import polars as pl
import pytest
from openai_server import last_user, serving
from tiny_lm import tiny_home

from sft_select.flows.tegit import TegitParams, meta_set, tegit
from sft_select.storage import make_example
from sft_select.storage.examples import frame
from sft_select.tasks.finetune import Recipe, finetune_key
from sft_select.tasks.generate import provenance, text_id
from sft_select.tasks.judge import llm_signal
from sft_select.tasks.prompts import TEGIT_DISCRIMINATOR, TEGIT_TASK
from sft_select.tasks.signal_task import DatasetRef, get_store

pytestmark = pytest.mark.usefixtures("prefect_api")
RECIPE = Recipe(max_steps=2, batch_size=4, lr=1e-3, max_length=256, logging_steps=1, precision="fp32")
PASSAGES = [f"Passage {i}. The river number {i} flows {i * 10} kilometres to the sea." for i in range(6)]


def answer(request) -> str:
    text = last_user(request)
    i = int(re.search(r"Passage (\d+)\.", text).group(1))
    if "Decision:" in text:  # the discriminator: accept even passages, reject odd ones, passage 4 undecided
        return ["Decision: accept\nReason: grounded and correct.", "Decision: reject\nReason: the output is "
                "not in the passage."][i % 2] if i != 4 else "It depends."
    if i == 5:
        return "I cannot design a task for this."
    return f"Instruction: How long is river {i}?\nInput: none\nOutput: River {i} is {i * 10} kilometres long."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with tiny_home(tmp_path_factory.mktemp("tegit")) as (base, mp):
        yield base, mp


def test_tegit_keeps_exactly_the_accepted_tasks_and_a_fine_tuned_generator_writes_round_2(tiny, monkeypatch):
    base, _ = tiny
    store = get_store()
    pool = frame([make_example([{"role": "user", "content": f"Summarise.\n\n{p}"},
                                {"role": "assistant", "content": "A river."}], instruction="Summarise.", input=p)
                  for p in PASSAGES])
    store.datasets.register("rivers", pool)
    with serving(answer, monkeypatch) as server:
        params = TegitParams(dataset="rivers", generator="openai:gen", dedup_tau=None)
        result = tegit(params)
        assert server.requests == 6 + 5  # a task for each passage (5 parse), a verdict on each task
        tasks = DatasetRef.load("rivers-tegit").read()
        rows = provenance(tasks)
        assert tasks.height == 5 and set(rows["round"]) == {1}
        assert dict(zip(tasks["instruction"], rows["parents"].to_list()))["How long is river 2?"] == [text_id(PASSAGES[2])]
        chosen = store.selections.read(result.selection_id).join(tasks, on="uid")
        assert sorted(chosen["instruction"]) == ["How long is river 0?", "How long is river 2?"]
        assert set(chosen["reason"]) == {"accepted: grounded and correct."}
        verdicts = store.signals.read(llm_signal(TEGIT_DISCRIMINATOR, "openai:gen"), tasks["uid"])
        rejected = [json.loads(v) for v in verdicts["value"].drop_nulls() if not json.loads(v)["accept"]]
        assert len(rejected) == 2 and rejected[0]["reason"] == "the output is not in the passage."
        undecided = verdicts.filter(pl.col("error").is_not_null())
        assert undecided.height == 1 and undecided["raw"][0] == "It depends."
        assert tegit(params).selection_id == result.selection_id and server.requests == 11  # nothing asked again

        # the generator fine-tuned on the tasks accepted for the first 4 passages writes the other 2
        tuned = tegit(TegitParams(dataset="rivers", generator="openai:gen", dedup_tau=None, finetune_generator=True,
                                  meta_documents=4, base=base, recipe=RECIPE, output="rivers-tegit-ft"))
        accepted = tasks.filter(pl.col("instruction").is_in(["How long is river 0?", "How long is river 2?"]))
        key = finetune_key(meta_set(accepted, {text_id(p): p for p in PASSAGES}), base, RECIPE)
        round2 = store.signals.read(llm_signal(TEGIT_TASK, f"local:finetuned:{key}"))
        assert round2.height == 2  # passages 4 and 5, by the tiny generator (stored, parsed or not)
        assert server.requests == 11 + round2["error"].is_null().sum()  # only its parsed tasks were judged
        assert tuned.rows <= 2 + round2["error"].is_null().sum()
