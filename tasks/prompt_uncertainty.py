"""prompt_uncertainty: Active Instruction Tuning's prompt sensitivity of an example as a signal
(Kung et al. 2023, "Active Instruction Tuning: Improving Cross-Task Generalization by Training on
Prompt Sensitive Tasks"; the method is ``flows/active_it.py``). Reads ``messages``,
``instruction``, ``input`` (and ``output`` for ``target="reference"``); writes one float.

With ``y`` the model's greedy prediction under the original instruction (or the dataset's answer,
``target="reference"``), ``p(y | x) = exp(-s(y | x))`` and ``x_k`` the instruction with each word
dropped with probability ``drop_prob``::

    u = (1 / K) * sum_k | p(y | x_k) - p(y | x) |

Each example's perturbations come from a generator seeded by the example's uid, so they do not
depend on the batch it is in; ``raw`` keeps the prediction and every ``p``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import polars as pl

from sft_select.storage import BatchResult, Outcome, Signal
from sft_select.storage.signals import Compute
from sft_select.tasks.backends.loss_engine import Template, example_losses
from sft_select.tasks.backends.chat import get_llm
from sft_select.tasks.backends.models import load_scoring_lm, model_identity
from sft_select.tasks.signal_task import signal_task
from sft_select.tasks.lm_loss import Precision, by_length

Target = Literal["prediction", "reference"]
_WORD = re.compile(r"\S+\s*")


# -- perturbing an instruction ------------------------------------------------------------------------------


def drop_words(text: str, p: float, rng: np.random.Generator) -> str:
    """``text`` with each whitespace-separated word dropped with probability ``p`` (a dropped word
    takes the whitespace after it along); with ``p = 0`` the text comes back unchanged."""
    words = _WORD.findall(text)
    keep = rng.random(len(words)) >= p
    return "".join(w for w, k in zip(words, keep) if k).strip()


def with_instruction(row: Mapping[str, Any], instruction: str) -> dict[str, Any]:
    """The example with its instruction replaced: the start of the last user turn (an Alpaca
    ``input`` after it stays as it is), or the whole turn when it does not start with it."""
    messages = [dict(m) for m in row["messages"]]
    turn = max(i for i, m in enumerate(messages) if m["role"] == "user")
    content, original = messages[turn]["content"], row["instruction"]
    rest = content[len(original):] if original and content.startswith(original) else ""
    messages[turn]["content"] = instruction + rest
    return {**row, "messages": messages, "instruction": instruction}


def prompt_turns(row: Mapping[str, Any]) -> list[dict[str, str]]:
    """The turns before the final answer."""
    messages = row["messages"]
    return [dict(m) for m in (messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages)]


def with_answer(row: Mapping[str, Any], answer: str) -> dict[str, Any]:
    """The example with ``answer`` as its final assistant turn."""
    return {**row, "messages": [*prompt_turns(row), {"role": "assistant", "content": answer}]}


def _rng(seed: int, uid: str) -> np.random.Generator:
    """One generator per example, so its perturbations do not depend on the batch it is in."""
    return np.random.default_rng([seed, int(uid[:15], 16)])


# -- the signal --------------------------------------------------------------------------------------------------


def prompt_uncertainty_signal(model: str, *, target: Target = "prediction", template: Template = "chat",
                              perturbations: int = 10, drop_prob: float = 0.2, seed: int = 0,
                              max_new_tokens: int = 128, max_length: int = 1024,
                              precision: Precision = "float32") -> Signal:
    """``prompt_uncertainty`` of an example: mean over perturbations of ``|p(y|x_k) - p(y|x)|``.
    Reads ``messages``, ``instruction``, ``input`` (and ``output`` for ``target="reference"``);
    writes one float; ``raw`` holds the prediction and the probabilities."""
    params: dict[str, Any] = {"model": model_identity(model), "target": target, "template": template,
                              "perturbations": perturbations, "drop_prob": drop_prob, "seed": seed,
                              "max_length": max_length, "precision": precision}
    if target == "prediction":
        params["max_new_tokens"] = max_new_tokens
    return Signal("prompt_uncertainty", params, version="1", kind="float")


def build_prompt_uncertainty(signal: Signal, token_budget: int = 8192) -> Compute:
    """The batch function of a ``prompt_uncertainty`` signal: (greedy predictions,) then every
    example's original and perturbed prompts scored in one batched pass of the loss engine.
    Identical prompts are scored once, so an unchanged perturbation gives exactly 0."""
    p = signal.params
    model, tokenizer = load_scoring_lm(p["model"], p["precision"])
    chat = get_llm(f"local:{p['model']}") if p["target"] == "prediction" else None

    def compute(batch: pl.DataFrame) -> BatchResult:
        rows = batch.select("uid", "messages", "instruction", "input", "output").to_dicts()
        failed = {i: Outcome(error="no user turn to perturb", final=True)
                  for i, r in enumerate(rows) if not any(m["role"] == "user" for m in r["messages"])}
        targets = [r["output"] for r in rows]
        usage: dict[str, float] = {}
        if chat is not None:
            results = chat.chat([prompt_turns(r) for r in rows], temperature=0.0, max_tokens=p["max_new_tokens"])
            usage = {"completion_tokens": float(sum(r.completion_tokens for r in results))}
            targets = [r.text or "" for r in results]
            for i, r in enumerate(results):
                if i in failed:
                    continue
                if r.error:
                    failed[i] = Outcome(error=f"prediction failed: {r.error}")
                elif not targets[i]:
                    failed[i] = Outcome(error="the model's prediction is empty", final=True)

        scored: list[dict[str, Any]] = []
        index: dict[tuple[int, str], int] = {}
        variants: list[list[int]] = []
        for i, row in enumerate(rows):
            if i in failed:
                variants.append([])
                continue
            rng = _rng(p["seed"], row["uid"])
            texts = [row["instruction"]] + [drop_words(row["instruction"], p["drop_prob"], rng)
                                            for _ in range(p["perturbations"])]
            for text in texts:
                if (i, text) not in index:
                    index[(i, text)] = len(scored)
                    scored.append(with_answer(with_instruction(row, text), targets[i]))
            variants.append([index[(i, text)] for text in texts])
        losses = example_losses(model, tokenizer, scored, template=p["template"], max_length=p["max_length"],
                                token_budget=token_budget, bf16=p["precision"] == "bfloat16")

        outcomes = []
        for i, slots in enumerate(variants):
            if i in failed:
                outcomes.append(failed[i])
                continue
            errors = [losses[s].error for s in slots if losses[s].error]
            if errors:
                outcomes.append(Outcome(error=errors[0], final=True))
                continue
            probs = [math.exp(-losses[s].loss) for s in slots]
            raw = {"p_original": probs[0], "p_perturbed": probs[1:]}
            if chat is not None:
                raw["prediction"] = targets[i]
            outcomes.append(Outcome(value=float(np.mean(np.abs(np.subtract(probs[1:], probs[0])))),
                                    raw=json.dumps(raw, ensure_ascii=False)))
        usage["prompt_tokens"] = float(sum(r.context_tokens + r.answer_tokens for r in losses))
        return BatchResult(outcomes, usage)

    return compute


probe_uncertainty = signal_task("prompt-uncertainty", build_prompt_uncertainty, batch_size=16, order_by=by_length,
                                retry_delay_seconds=[2, 8])
"""Prefect task ``(signal, dataset, batch_size=, uids=)``: the signal for the probed examples only."""
