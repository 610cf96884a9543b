"""The IFD flow on a tiny random Llama: the score is the ratio of the two answer losses computed by
hand, the filter drops IFD >= 1 and keeps over-length examples scored on their truncated answer,
the default Cherry budget is 6% of the candidates, the Superfiltering variant is the ratio of
perplexities with s(A) of the answer alone (first token unscored, never from SmolLM2's
``<|im_start|>`` BOS), the pre-experience step fine-tunes on the middle perplexity band of each
cluster in the prompt that scoring uses, and a second run computes nothing."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import torch
from test_lm import hand_loss
from tiny_lm import WORDS, build_tiny_llama, repeat_word

from sft_select.flows.ifd import IFDParams, as_scored, ifd, ifd_table, pre_experience_sample
from sft_select.settings import settings
from sft_select.storage import fingerprint, make_example
from sft_select.storage.examples import frame
from sft_select.tasks.backends import loss_engine as lm
from sft_select.tasks.backends.models import load_causal_lm, model_identity
from sft_select.tasks.finetune import Recipe
from sft_select.tasks.lm_loss import lm_loss_signal

pytestmark = pytest.mark.usefixtures("prefect_api")
torch.set_num_threads(1)

LONG = make_example([{"role": "user", "content": "List every fruit you know.\n\napple pear"},
                     {"role": "assistant", "content": ", ".join(WORDS * 4)}],
                    instruction="List every fruit you know.", input="apple pear")
LONGER = [make_example([{"role": "user", "content": f"Name {k} fruits, comma separated."},  # IFD just under 1
                        {"role": "assistant", "content": sep.join(WORDS[k:] + WORDS[:k]) * 3}])
          for k, sep in ((6, ", "), (7, " "), (8, ", "))]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture
def pool(store):
    rows = [make_example([{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}])
            for r in map(repeat_word, WORDS)] + [LONG, *LONGER]
    store.datasets.register("fruit", frame(rows))
    return {r["uid"]: r for r in rows}


def parts(store, *signals) -> list:
    return sorted(p for s in signals for p in store.signals.dir(s).glob("part-*.parquet"))


def test_cherry_ifd_is_the_loss_ratio_and_keeps_over_length_items(pool, store, tiny_path):
    ref = ifd(IFDParams(dataset="fruit", model=tiny_path, pre_experience=False, max_length=64, budget=len(pool)))
    chosen = store.selections.read(ref.selection_id)
    cond = lm_loss_signal(tiny_path, conditioned=True, template="alpaca", max_length=64)
    uncond = lm_loss_signal(tiny_path, conditioned=False, template="alpaca", max_length=64)
    table = ifd_table(cond, uncond, list(pool))

    # one example by hand: Alpaca prompt + answer, then "### Response:" + the same answer tokens
    model, tok = load_causal_lm(tiny_path)
    short = chosen.join(table.filter(~pl.col("truncated")).select("uid"), on="uid", how="semi")
    uid = short["uid"][0]
    context, answer = lm.render(pool[uid], tok, "alpaca")
    ctx_ids, full = tok(context)["input_ids"], tok(context + answer)["input_ids"]
    assert full[: len(ctx_ids)] == ctx_ids
    header = tok("### Response:")["input_ids"]
    by_hand = hand_loss(model, full, len(ctx_ids)) / hand_loss(model, header + full[len(ctx_ids):], len(header))
    assert short["score"][0] == pytest.approx(by_hand, abs=1e-5)
    assert chosen["reason"][0].startswith("IFD ") and chosen["reason"][0].endswith("rank 1")

    # the rule: IFD < 1, highest first; an over-length item is a candidate scored on its truncated answer
    assert table.filter(pl.col("ifd") >= 1).height >= 2
    long = table.filter(pl.col("truncated"))
    assert set(long["uid"]) == {LONG["uid"], *(r["uid"] for r in LONGER)}
    long_candidates = long.filter(pl.col("ifd") < 1)["uid"].to_list()
    assert long_candidates  # over-length and IFD < 1: a candidate like any other
    expected = table.filter(pl.col("ifd") < 1).sort("ifd", descending=True)
    assert chosen["uid"].to_list() == expected["uid"].to_list()
    assert (chosen["score"] < 1).all() and set(long_candidates) <= set(chosen["uid"])
    np.testing.assert_allclose(chosen["score"].to_numpy(), expected["ifd"].to_numpy(), rtol=1e-12)

    # a second run with another budget reuses both loss signals: no new part
    before = parts(store, cond, uncond)
    again = ifd(IFDParams(dataset="fruit", model=tiny_path, pre_experience=False, max_length=64, budget=2))
    assert parts(store, cond, uncond) == before
    assert store.selections.read(again.selection_id)["uid"].to_list() == expected["uid"].to_list()[:2]


def test_superfiltering_is_the_perplexity_ratio_without_template(pool, store, tiny_path):
    ref = ifd(IFDParams(dataset="fruit", variant="superfiltering", model=tiny_path, budget=len(pool)))
    chosen = store.selections.read(ref.selection_id)
    assert chosen.height and (chosen["score"] < 1).all()
    assert json.loads(store.selections.list().filter(pl.col("selection_id") == ref.selection_id)["params"][0])[
        "max_length"] == 1024  # the authors' default for this variant

    model, tok = load_causal_lm(tiny_path)
    uid = chosen["uid"][-1]
    context, answer = lm.render(pool[uid], tok, "none")
    assert context == pool[uid]["instruction"] + "\n"  # Superfiltering's plain prompt
    ctx_ids, full = tok(context)["input_ids"], tok(context + answer)["input_ids"]
    alone = full[len(ctx_ids):]  # the answer alone: its first token predicts, it is not predicted
    assert tok("")["input_ids"] == [] and tok.bos_token == "<|im_start|>"  # no neutral start to score it from
    by_hand = math.exp(hand_loss(model, full, len(ctx_ids)) - hand_loss(model, alone, 1))
    assert chosen["score"][-1] == pytest.approx(by_hand, abs=1e-5)
    from_bos = math.exp(hand_loss(model, full, len(ctx_ids)) - hand_loss(model, [tok.bos_token_id] + alone, 1))
    assert abs(chosen["score"][-1] - from_bos) > 1e-4  # the old start from the chat role token is gone
    uncond = lm_loss_signal(tiny_path, conditioned=False, template="none", max_length=1024)
    assert uncond.version == "2" and lm_loss_signal(tiny_path, conditioned=False, template="alpaca").version == "1"
    assert json.loads(store.signals.read(uncond, [uid])["raw"][0])["context_tokens"] == 1


def test_cherry_default_budget_is_six_percent_of_the_candidates(store, tiny_path):
    rows = [make_example([{"role": "user", "content": f"Repeat {w} {i} times."},
                          {"role": "assistant", "content": ", ".join([w] * (1 + i % 5))}])
            for i, w in enumerate(WORDS * 4)]
    store.datasets.register("fruit48", frame(rows))
    ref = ifd(IFDParams(dataset="fruit48", model=tiny_path, pre_experience=False, max_length=64))
    table = ifd_table(lm_loss_signal(tiny_path, conditioned=True, template="alpaca", max_length=64),
                      lm_loss_signal(tiny_path, conditioned=False, template="alpaca", max_length=64),
                      [r["uid"] for r in rows])
    candidates = table.filter(pl.col("ifd") < 1).height
    assert 0 < candidates < 48 and math.ceil(0.06 * candidates) != math.ceil(0.05 * 48)  # not 5% of the pool
    assert ref.rows == math.ceil(0.06 * candidates)
    params = json.loads(store.selections.list().filter(pl.col("selection_id") == ref.selection_id)["params"][0])
    assert params["budget"] == ref.rows


def test_brief_fine_tune_sees_the_prompt_that_scoring_uses(tiny_path):
    from transformers import AutoTokenizer

    from sft_select.tasks.finetune import ALPACA_CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(tiny_path)
    tok.chat_template = ALPACA_CHAT_TEMPLATE  # what the brief fine-tune (recipe template "alpaca") renders with
    plain = make_example([{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "A fig."}])
    rewritten = as_scored(frame([LONG, plain]))
    for original, row in zip((LONG, plain), rewritten.to_dicts()):
        trained = tok.apply_chat_template(row["messages"], tokenize=False)
        context, answer = lm.render(original, tok, "alpaca")
        assert trained == tok.bos_token + context + answer + tok.eos_token  # the scored prompt, then the answer
    assert "### Input:\napple pear\n\n### Response:" in tok.apply_chat_template(rewritten["messages"][0],
                                                                                 tokenize=False)
    assert rewritten["uid"][0] != LONG["uid"] and rewritten["uid"][1] == plain["uid"]  # its own fine-tune key


def test_pre_experience_sample_takes_the_middle_band_of_each_cluster():
    rng = np.random.default_rng(0)
    sizes = {0: 40, 1: 21, 2: 3}
    frame_ = pl.DataFrame({"uid": [f"u{c}-{i}" for c, n in sizes.items() for i in range(n)],
                           "cluster": [c for c, n in sizes.items() for _ in range(n)],
                           "prompt_loss": rng.uniform(0.5, 4.0, sum(sizes.values()))},
                          schema_overrides={"cluster": pl.Int32})
    sample = pre_experience_sample(frame_, per_cluster=5)
    assert sample.group_by("cluster").len().sort("cluster")["len"].to_list() == [5, 5, 3]
    for c in (0, 1):
        ppl = np.exp(frame_.filter(pl.col("cluster") == c)["prompt_loss"].to_numpy())
        lo, hi = np.percentile(ppl, [25, 75])
        got = np.exp(sample.filter(pl.col("cluster") == c)["prompt_loss"].to_numpy())
        assert ((got >= lo) & (got <= hi)).all() and len(set(got)) == 5
        assert got.min() == pytest.approx(ppl[ppl >= lo].min())  # spread over the band: its two ends
        assert got.max() == pytest.approx(ppl[ppl <= hi].max())
    assert set(sample.filter(pl.col("cluster") == 2)["uid"]) == {"u2-0", "u2-1", "u2-2"}  # small: all of it


def test_cherry_scores_with_the_pre_experienced_model(pool, store, tiny_path, tmp_path, monkeypatch):
    # a model cache of this test's own: a LoRA adapter cached by an earlier session names a base folder
    # that session's temporary directory held, which may be gone
    monkeypatch.setenv("SFT_SELECT_MODEL_CACHE", str(tmp_path / "models"))
    settings.cache_clear()
    recipe = Recipe(max_steps=2, batch_size=4, template="alpaca", save_steps=100)
    # per_cluster above every cluster's size: the whole pool is the brief-experience sample
    ref = ifd(IFDParams(dataset="fruit", model=tiny_path, max_length=64, budget=len(pool), clusters=2, per_cluster=20,
                        recipe=recipe))
    (trained,) = [json.loads(p.read_text()) for p in (tmp_path / "models").rglob("finetune.json")]
    rewritten = as_scored(store.datasets.read("fruit"))  # LONG with its "### Input:" section, as scored
    assert trained["selection_fingerprint"] == fingerprint(rewritten["uid"]) != fingerprint(list(pool))
    models = store.catalog.query("SELECT name, model FROM signals ORDER BY name")
    scorers = models.filter(pl.col("name") == "lm_loss")["model"].to_list()
    assert len(scorers) == 2 and all("finetuned" in m for m in scorers)  # both losses by the experienced model
    base = {model_identity(tiny_path)}  # named by content, not by its folder
    assert set(models.filter(pl.col("name") != "lm_loss")["model"]) == base  # embeddings, perplexity: the base
    assert store.selections.read(ref.selection_id)["score"].lt(1).all()
