"""The loss engine against hand computations: one plain forward pass over the whole sequence and the
cross-entropy of the answer slice, on a tiny random Llama (and once on the real SmolLM2)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from tiny_lm import build_tiny_llama

from sft_select.storage import make_example
from sft_select.storage.examples import frame
from sft_select.tasks.backends import loss_engine as lm
from sft_select.tasks.backends.models import load_causal_lm
from sft_select.tasks.signal_task import DatasetRef, fill_signal
from sft_select.tasks.lm_loss import build_lm_loss, lm_loss_signal

torch.set_num_threads(1)

ALPACA = make_example([{"role": "user", "content": "Translate to English.\n\nBonjour le monde"},
                       {"role": "assistant", "content": "Hello world, and good morning to everyone here."}],
                      instruction="Translate to English.", input="Bonjour le monde")
CHAT = make_example([{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Name a fruit."},
                     {"role": "assistant", "content": "A pear."},
                     {"role": "user", "content": "And a red one?"},
                     {"role": "assistant", "content": "An apple, a cherry or a strawberry."}])


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return load_causal_lm(tiny_path)


def hand_loss(model, ids: list[int], answer_start: int, answer_end: int | None = None) -> float:
    """Mean cross-entropy of ids[answer_start:answer_end], one forward pass, no batching."""
    answer_end = len(ids) if answer_end is None else answer_end
    with torch.no_grad():
        logits = model(torch.tensor([ids[:answer_end]])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor(ids[answer_start:answer_end])
    return float(-logp[answer_start - 1 : answer_end - 1].gather(1, targets[:, None]).mean())


def test_chat_losses_equal_a_hand_computation(tiny):
    model, tok = tiny
    context = tok.apply_chat_template(CHAT["messages"][:-1], tokenize=False, add_generation_prompt=True)
    answer = CHAT["messages"][-1]["content"]
    ctx_ids = tok(context, add_special_tokens=False)["input_ids"]
    full = tok(context + answer, add_special_tokens=False)["input_ids"]
    assert full[: len(ctx_ids)] == ctx_ids
    expected_conditioned = hand_loss(model, full, len(ctx_ids))
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]  # ChatML's answer header
    answer_ids = full[len(ctx_ids):]
    expected_unconditioned = hand_loss(model, header + answer_ids, len(header))

    cond, = lm.example_losses(model, tok, [CHAT], conditioned=True, template="chat")
    uncond, = lm.example_losses(model, tok, [CHAT], conditioned=False, template="chat")
    assert cond.loss == pytest.approx(expected_conditioned, abs=1e-5)
    assert uncond.loss == pytest.approx(expected_unconditioned, abs=1e-5)
    assert cond.answer_tokens == uncond.answer_tokens == len(answer_ids) and not cond.truncated
    assert (cond.context_tokens, uncond.context_tokens) == (len(ctx_ids), len(header))
    assert cond.loss != pytest.approx(uncond.loss, abs=1e-3)


def test_alpaca_and_plain_templates_render_the_published_prompts(tiny):
    _, tok = tiny
    context, answer = lm.render(ALPACA, tok, "alpaca")
    assert context == ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                       "Translate to English.\n\n### Input:\nBonjour le monde\n\n### Response:")
    assert answer == "Hello world, and good morning to everyone here."
    assert lm.render(ALPACA, tok, "alpaca", conditioned=False)[0] == "### Response:"
    assert lm.render(ALPACA, tok, "none")[0] == "Translate to English.\nBonjour le monde\n"  # Superfiltering
    multi, _ = lm.render(CHAT, tok, "alpaca")
    assert multi == ("Be brief.\n\n### Instruction:\nName a fruit.\n\n### Response:A pear.\n\n"
                     "### Instruction:\nAnd a red one?\n\n### Response:")


def test_truncation_counts_the_same_answer_tokens_in_both_conditions(tiny):
    model, tok = tiny
    context, answer = lm.render(ALPACA, tok, "alpaca")
    full = lm.encode(tok, context, answer)
    max_length = len(full.context) + 4  # room for four answer tokens only
    cond, = lm.example_losses(model, tok, [ALPACA], template="alpaca", max_length=max_length)
    uncond, = lm.example_losses(model, tok, [ALPACA], template="alpaca", conditioned=False, max_length=max_length)
    assert cond.answer_tokens == uncond.answer_tokens == 4 and cond.truncated and uncond.truncated
    assert cond.answer_tokens_total == len(full.answer)
    ids = list(full.context + full.answer)
    assert cond.loss == pytest.approx(hand_loss(model, ids, len(full.context), max_length), abs=1e-5)
    header = tok("### Response:")["input_ids"]
    uncond_ids = header + list(full.answer[:4])
    assert uncond.loss == pytest.approx(hand_loss(model, uncond_ids, len(header)), abs=1e-5)

    too_short, = lm.example_losses(model, tok, [ALPACA], template="alpaca", max_length=len(full.context))
    assert too_short.loss is None and "leaves no answer token" in too_short.error


def test_an_example_that_cannot_be_scored_is_an_error_and_spares_the_others(tiny):
    model, tok = tiny
    strict = copy.deepcopy(tok)
    strict.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
                            + tok.chat_template)
    no_answer = make_example([{"role": "user", "content": "Hello?"}])
    results = lm.example_losses(model, strict, [CHAT, ALPACA, no_answer])
    assert "no system turns" in results[0].error and results[0].loss is None
    assert results[1].error is None
    assert results[1].loss == pytest.approx(lm.example_losses(model, tok, [ALPACA])[0].loss, abs=1e-6)
    assert "no answer" in results[2].error
    with pytest.raises(ValueError, match="unknown template"):
        lm.example_losses(model, tok, [ALPACA], template="vicuna")


def test_boundary_inside_a_token_never_scores_context(tiny):
    model, tok = tiny
    context, answer = "Answer: ", "yes, certainly"  # 'Ġyes' would swallow the context's trailing space
    ctx_ids = tok(context)["input_ids"]
    assert tok(context + answer)["input_ids"][: len(ctx_ids)] != ctx_ids
    enc = lm.encode(tok, context, answer)
    assert list(enc.context) == ctx_ids and list(enc.answer) == tok(answer, add_special_tokens=False)["input_ids"]
    assert lm.answer_losses(model, [enc])[0] == pytest.approx(
        hand_loss(model, ctx_ids + list(enc.answer), len(ctx_ids)), abs=1e-5)
    empty = lm.encode(tok, "", answer)  # nothing in front: the first answer token is predicted from BOS
    assert empty.context == (tok.bos_token_id,) and list(empty.answer) == tok(answer)["input_ids"]


def test_batched_length_sorted_values_equal_one_by_one(tiny):
    model, tok = tiny
    rng = np.random.default_rng(0)
    words = "the a fruit pear apple red green sweet sour ripe seed tree leaf".split()
    rows = [make_example([{"role": "user", "content": " ".join(rng.choice(words, rng.integers(1, 30)))},
                          {"role": "assistant", "content": " ".join(rng.choice(words, rng.integers(1, 60)))}])
            for _ in range(23)]
    single: dict[bool, list[float]] = {}
    for conditioned in (True, False):
        batched = lm.example_losses(model, tok, rows, conditioned=conditioned, token_budget=512)
        single[conditioned] = [lm.example_losses(model, tok, [r], conditioned=conditioned)[0].loss for r in rows]
        np.testing.assert_allclose([b.loss for b in batched], single[conditioned], atol=1e-5, rtol=0)
    assert lm._output_head(model) is not None  # a Llama's logits are its output layer on the last hidden state
    lm._head_ok[model] = None  # the general path: the model's own logits from the first answer position on
    try:
        general = lm.example_losses(model, tok, rows, token_budget=512)
    finally:
        del lm._head_ok[model]
    np.testing.assert_allclose([g.loss for g in general], single[True], atol=1e-5, rtol=0)
    # longest first, at most 8 padded tokens a batch, no row padded by more than a quarter
    assert list(lm.length_batches([3, 1, 2, 4], token_budget=8)) == [[3, 0], [2], [1]]
    assert list(lm.length_batches([3, 1, 2, 4], token_budget=8, max_padding=0.9)) == [[3, 0], [2, 1]]


def test_hidden_states_mean_and_last_pooling(tiny):
    model, tok = tiny
    texts = ["a short one", "a somewhat longer text about pears and apples", "a short one"]
    mean = lm.hidden_states(model, tok, texts, pooling="mean", token_budget=16)
    last = lm.hidden_states(model, tok, texts, pooling="last")
    with torch.no_grad():
        states = model.get_decoder()(torch.tensor([tok(texts[1])["input_ids"]])).last_hidden_state[0]
    np.testing.assert_allclose(mean[1], states.mean(0).numpy(), atol=1e-5)
    np.testing.assert_allclose(last[1], states[-1].numpy(), atol=1e-5)
    np.testing.assert_allclose(mean[0], mean[2], atol=1e-6)
    assert mean.dtype == np.float32 and mean.shape == (3, model.config.hidden_size)


def test_lm_loss_signal_fills_the_store_once(tiny, tiny_path, store):
    model, tok = tiny
    path = tiny_path
    examples = frame([ALPACA, CHAT])
    info = store.datasets.register("pair", examples)
    dataset = DatasetRef.of(info)
    signal = lm_loss_signal(path, conditioned=True, template="chat", max_length=64)
    ref = fill_signal(signal, dataset, build_lm_loss)
    assert (ref.computed, ref.errors) == (2, 0)
    values = store.signals.values(signal, examples["uid"])["lm_loss"].to_list()
    expected = [r.loss for r in lm.example_losses(model, tok, examples.to_dicts(), template="chat", max_length=64)]
    np.testing.assert_allclose(values, expected, atol=1e-6)
    assert all(json.loads(r)["answer_tokens"] > 0 for r in store.signals.read(signal)["raw"])
    again = fill_signal(signal, dataset, lambda s: pytest.fail("nothing is missing: the model must not load"))
    assert (again.computed, again.reused) == (0, 2)
    assert lm_loss_signal(path, conditioned=False, template="chat", max_length=64).id != signal.id


@pytest.mark.slow
def test_smollm2_loss_equals_a_hand_computation():
    pytest.importorskip("gguf")
    model, tok = load_causal_lm("smollm2-135m-instruct")
    context, answer = lm.render(ALPACA, tok, "chat")
    ctx_ids = tok(context, add_special_tokens=False)["input_ids"]
    full = tok(context + answer, add_special_tokens=False)["input_ids"]
    got, = lm.example_losses(model, tok, [ALPACA], template="chat")
    assert got.loss == pytest.approx(hand_loss(model, full, len(ctx_ids)), abs=1e-4)
    assert 0.1 < got.loss < 10


def test_int8_is_a_quantised_copy_and_a_signal_of_its_own(tiny_path, tiny):
    from sft_select.tasks.backends.models import load_scoring_lm

    model, tok = tiny
    quantised, _ = load_scoring_lm(tiny_path, "int8")
    # float32 is the one loaded model (no second copy in memory); int8 a copy of its own
    assert load_scoring_lm(tiny_path, "float32")[0] is load_causal_lm(tiny_path)[0] is not quantised
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    # every linear layer, the output layer too, is quantised (7 a layer, 2 layers, the output layer)
    assert sum(isinstance(m, DynamicQuantizedLinear) for m in quantised.modules()) == 15
    assert not any(type(m) is torch.nn.Linear for m in quantised.modules())
    assert all(type(m).__name__ == "Linear" for m in model.modules() if "Linear" in type(m).__name__)  # untouched
    rows = [ALPACA, CHAT]
    full = [r.loss for r in lm.example_losses(model, tok, rows)]
    low = [r.loss for r in lm.example_losses(quantised, tok, rows)]
    assert low != full and np.allclose(low, full, rtol=0.05)  # close, not equal: hence its own signal
    ids = {lm_loss_signal(tiny_path, precision=p).id for p in ("float32", "bfloat16", "int8")}
    assert len(ids) == 3
    with pytest.raises(ValueError, match="unknown precision"):
        load_scoring_lm(tiny_path, "int4")
