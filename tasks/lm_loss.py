"""lm_loss: the answer loss of every example as a signal (reads ``messages``, ``instruction``,
``input``; writes one float).

    lm_loss = s(A | Q) = mean over answer tokens of -log p(a_t | Q, a_<t)     (conditioned)
    lm_loss = s(A)     = mean over answer tokens of -log p(a_t | a_<t)        (unconditioned)

computed by :func:`sft_select.tasks.backends.loss_engine.example_losses` (exact answer masks, the same answer
tokens in both conditions under ``max_length``). IFD is the ratio of the two signals (Li et al.
2023a); perplexity is ``exp(lm_loss)``.

``prompt_loss`` (reads the same columns, writes one float) is the loss of the rendered prompt's own
tokens, each predicted from the ones before it: ``exp(prompt_loss)`` is the instruction perplexity
of Cherry's pre-experience sample (``flows/ifd.py``).

Besides the value, each row's ``raw`` holds ``{"context_tokens", "answer_tokens",
"answer_tokens_total"}`` as JSON, so a method can tell examples whose answer was truncated
(IFD counts its over-length items) without recomputing anything. The unconditioned loss with
``template="none"`` (Superfiltering's ``s(A)``) leaves the answer's first token unscored (version 2). An example with no answer token within
``max_length`` is an error row.
"""

from __future__ import annotations

import json
from typing import Literal

import numpy as np
import polars as pl

from sft_select.settings import settings
from sft_select.storage import BatchResult, Outcome, Signal
from sft_select.storage.signals import Compute
from sft_select.tasks.backends.loss_engine import Template, answer_losses, encode_many, example_losses, render
from sft_select.tasks.backends.models import load_scoring_lm, model_identity
from sft_select.tasks.signal_task import signal_task

Precision = Literal["float32", "bfloat16", "int8"]
VERSION = "1"
# s(A) with template "none" no longer starts from the tokenizer's BOS (a chat role token for SmolLM2):
# its first answer token is unscored, as Superfiltering's code does; values differ, hence version 2
UNCONDITIONED_NONE_VERSION = "2"


def lm_loss_signal(model: str | None = None, *, conditioned: bool = True, template: Template = "chat",
                   max_length: int = 2048, precision: Precision = "float32") -> Signal:
    """The ``lm_loss`` signal for these parameters (``model`` defaults to ``settings().local_llm``).
    ``precision="bfloat16"`` runs under bf16 autocast (fast where the CPU or GPU has bf16 units);
    ``"int8"`` dynamically quantises the linear layers (CPU; see ``load_scoring_lm``). Values differ
    from float32 in the third digit, hence a different signal; docs/results.md validates each
    against float32."""
    return Signal("lm_loss", {"model": model_identity(model or settings().local_llm), "conditioned": conditioned,
                              "template": template, "max_length": max_length, "precision": precision},
                  version=VERSION if conditioned or template != "none" else UNCONDITIONED_NONE_VERSION, kind="float")


def by_length(examples: pl.DataFrame) -> pl.DataFrame:
    """Longest conversations first (characters), so that each batch holds sequences of similar length
    and pads little (the `order_by` of the loss and embedding signals)."""
    chars = pl.col("messages").list.eval(pl.element().struct.field("content").str.len_chars()).list.sum()
    return examples.sort(chars, descending=True, maintain_order=True)


def build_lm_loss(signal: Signal, token_budget: int = 8192) -> Compute:
    """The batch function of an ``lm_loss`` signal: loads the model once, then scores batches."""
    p = signal.params
    model, tokenizer = load_scoring_lm(p["model"], p["precision"])

    def compute(batch: pl.DataFrame) -> BatchResult:
        results = example_losses(model, tokenizer, batch.select("messages", "instruction", "input").to_dicts(),
                                 conditioned=p["conditioned"], template=p["template"], max_length=p["max_length"],
                                 token_budget=token_budget, bf16=p["precision"] == "bfloat16")
        outcomes = [
            # the same model on the same text fails the same way: loss errors are final, not retried
            Outcome(value=r.loss, error=r.error, final=r.error is not None,
                    raw=json.dumps({"context_tokens": r.context_tokens, "answer_tokens": r.answer_tokens,
                                    "answer_tokens_total": r.answer_tokens_total}))
            for r in results
        ]
        tokens = sum(r.context_tokens + r.answer_tokens for r in results)
        return BatchResult(outcomes, {"prompt_tokens": float(tokens)})

    return compute


lm_loss = signal_task("lm_loss", build_lm_loss, batch_size=64, order_by=by_length)


def prompt_loss_signal(model: str, *, template: Template = "alpaca", max_length: int = 512,
                       precision: Precision = "float32") -> Signal:
    """``prompt_loss`` = mean cross-entropy of the rendered prompt's own tokens, each predicted from
    the ones before it (the first from BOS); the instruction perplexity is ``exp(prompt_loss)``.
    Reads ``messages``, ``instruction``, ``input``; writes one float."""
    return Signal("prompt_loss", {"model": model_identity(model), "template": template, "max_length": max_length,
                                  "precision": precision}, version="1", kind="float")


def build_prompt_loss(signal: Signal, token_budget: int = 8192) -> Compute:
    """The batch function of a ``prompt_loss`` signal: the loss engine with the prompt as the
    scored text and an empty context."""
    p = signal.params
    model, tokenizer = load_scoring_lm(p["model"], p["precision"])
    special = p["template"] != "chat"  # a chat template writes its own BOS

    def compute(batch: pl.DataFrame) -> BatchResult:
        prompts = [render(row, tokenizer, p["template"])[0]
                   for row in batch.select("messages", "instruction", "input").to_dicts()]
        items = [e.truncate(p["max_length"]) for e in
                 encode_many(tokenizer, [""] * len(prompts), prompts, add_special_tokens=special)]
        losses = answer_losses(model, items, token_budget=token_budget, bf16=p["precision"] == "bfloat16")
        outcomes = [Outcome(value=float(v)) if np.isfinite(v) else Outcome(error="empty prompt", final=True)
                    for v in losses]
        return BatchResult(outcomes, {"prompt_tokens": float(sum(len(e) for e in items))})

    return compute


prompt_loss = signal_task("prompt_loss", build_prompt_loss, batch_size=64, order_by=by_length)
