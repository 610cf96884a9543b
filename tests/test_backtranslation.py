"""Backtranslation (Humpback) on a real loopback OpenAI-compatible server (the backward model and M0,
scripted) and a tiny Llama fine-tuned for M1: curation keeps exactly the pairs rated 5, records the
unparseable ratings with their raw text, round 2 is rated by the model fine-tuned in round 1 (its
identity is in the round-2 signal), and a second run makes no call and trains nothing."""

from __future__ import annotations

import re

import polars as pl
import pytest
from openai_server import last_user, serving
from tiny_lm import tiny_home

from sft_select.flows.backtranslation import BacktranslationParams, backtranslation, reversed_pairs
from sft_select.storage import NotFilled, make_example
from sft_select.storage.examples import frame
from sft_select.tasks.finetune import Recipe, finetune_key
from sft_select.tasks.generate import provenance, text_id
from sft_select.tasks.judge import llm_signal
from sft_select.tasks.prompts import HUMPBACK_CURATION
from sft_select.tasks.signal_task import DatasetRef, dry_run, get_store

pytestmark = pytest.mark.usefixtures("prefect_api")
RECIPE = Recipe(max_steps=2, batch_size=4, lr=1e-3, max_length=128, logging_steps=1, precision="fp32")
TEXTS = [f"Text {i}: the {w} is a fruit that grows on trees in warm places." for i, w in
         enumerate(["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "lemon", "mango"])]


def answer(request) -> str:
    text = last_user(request)
    if request["model"] == "backward":  # the instruction for text i
        i = int(re.search(r"Text (\d+):", text).group(1))
        return f"Tell me about fruit number {i}."
    i = int(re.search(r"### Answer:\nText (\d+):", text).group(1))  # M0's rating of pair i
    return ["Clear and complete.\nScore: 5", "Reads like a web page.\nScore: 3", "I am not sure."][i % 3]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with tiny_home(tmp_path_factory.mktemp("backtranslation")) as (base, mp):
        yield base, mp


def test_two_rounds_keep_the_top_score_record_failures_and_rate_round_2_with_m1(tiny, tmp_path, monkeypatch):
    base, _ = tiny
    store = get_store()
    seed = frame([make_example([{"role": "user", "content": f"Name a colour, {c}."},
                                {"role": "assistant", "content": f"{c.capitalize()} is a colour."}])
                  for c in ["red", "blue", "green", "black"]])
    store.datasets.register("seed", seed)
    (tmp_path / "texts.txt").write_text("\n\n".join(TEXTS))
    params = BacktranslationParams(dataset="seed", unlabelled=str(tmp_path / "texts.txt"), base=base, recipe=RECIPE,
                                   backward="openai:backward", backward_prompted=False, seed_model="openai:m0",
                                   dedup_tau=None)
    with serving(answer, monkeypatch) as server:
        with dry_run() as plan:  # the plan counts the instructions to write, and calls nothing
            with pytest.raises(NotFilled):
                backtranslation(params)
        assert server.requests == 0 and plan.rows[0]["calls"] == 9

        result = backtranslation(params)
        assert server.requests == 18  # 9 instructions, 9 ratings by M0; round 2 is rated by the tiny M1
        dataset = DatasetRef.load("seed-backtranslation").read()
        generated = provenance(dataset)
        assert generated.height == 9 and dataset.height == 13 and set(generated["method"]) == {"backtranslation"}
        pair0 = dataset.filter(pl.col("instruction") == "Tell me about fruit number 0.")
        assert pair0["output"][0] == TEXTS[0] and generated.filter(pl.col("uid") == pair0["uid"][0])[
            "parents"].to_list() == [[text_id(TEXTS[0])]]

        # round 1: exactly the pairs M0 rated 5 are kept; the unparseable ratings are stored with their raw text
        m0 = store.signals.read(llm_signal(HUMPBACK_CURATION, "openai:m0"), generated["uid"])
        assert sorted(m0["value"].drop_nulls().to_list()) == [3.0] * 3 + [5.0] * 3
        failed = m0.filter(pl.col("error").is_not_null())
        assert failed.height == 3 and set(failed["raw"]) == {"I am not sure."}
        assert all(e.startswith("parse: no 'Score: N' line") for e in failed["error"])
        top = dataset.join(m0.filter(pl.col("value") == 5.0), on="uid", how="semi")
        assert sorted(top["instruction"]) == [f"Tell me about fruit number {i}." for i in (0, 3, 6)]

        # round 2 is rated by M1 = base fine-tuned on seed + the round-1 top pairs, named by its key
        m1 = finetune_key(pl.concat([seed, top.select(seed.columns)]), base, RECIPE)
        round2 = llm_signal(HUMPBACK_CURATION, f"local:finetuned:{m1}")
        assert round2.params["model"] == f"local:finetuned:{m1}"
        assert store.signals.read(round2, generated["uid"]).height == 9  # every candidate rated (or failed) by M1
        chosen = store.selections.read(result.selection_id)
        assert chosen.height == 4 + int((store.signals.values(round2, generated["uid"])["humpback_curation"] >= 5).sum())
        assert chosen.head(4)["reason"].to_list() == ["seed data"] * 4

        again = backtranslation(params)  # every answer stored, every model cached
        assert server.requests == 18 and again.selection_id == result.selection_id


def test_the_backward_model_learns_output_to_instruction():
    seed = frame([make_example([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
                               instruction="Q", input="ctx")])
    [row] = reversed_pairs(seed).to_dicts()
    assert [m["content"] for m in row["messages"]] == ["A", "Q\n\nctx"]
