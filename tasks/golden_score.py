"""golden_score: Nuggets' one-shot score of a candidate as a signal (Li et al. 2023c, "One Shot
Learning as Instruction Data Prospector for Large Language Models"; the method is
``flows/nuggets.py``). Reads ``messages``, ``instruction``, ``input``; writes one float in [0, 1].

With ``s_zs(j) = s(A_j | Q_j)`` an anchor's zero-shot answer loss and ``s_os(j | c)`` the loss of the
same answer tokens with candidate ``c`` written out in full (prompt, answer, a blank line) in front
of the anchor's prompt::

    GS(c) = (1 / |anchors|) * sum_j 1[ s_os(j | c) < s_zs(j) ]

Each batch of candidates is scored against every anchor in one pass of the loss engine. The anchor
set's fingerprint is a parameter of the signal, so other anchors give another signal; ``raw``
keeps how many anchors improved and the mean loss change.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import polars as pl

from sft_select.storage import BatchResult, Outcome, Signal, fingerprint
from sft_select.storage.signals import Compute
from sft_select.tasks.backends.loss_engine import Encoded, answer_losses, encode_many, render
from sft_select.tasks.backends.models import load_scoring_lm, model_identity
from sft_select.tasks.lm_loss import Precision

NuggetsTemplate = Literal["alpaca", "none"]
SEPARATOR = "\n\n"  # between the demonstration and the anchor's prompt


@dataclass(frozen=True)
class Anchors:
    """The anchors, ready to be scored against: each one's zero-shot sequence (prompt, answer), its
    prompt's ids without the tokenizer's leading special tokens (what follows a demonstration), and
    its zero-shot loss ``s_zs``. Anchors with no answer token within ``max_length`` are left out."""

    uids: list[str]
    zero_shot: list[Encoded]
    continuation: list[tuple[int, ...]]
    losses: np.ndarray


def prepare_anchors(model: Any, tokenizer: Any, rows: Sequence[Mapping[str, Any]], *,
                    template: NuggetsTemplate = "alpaca", max_length: int = 512, token_budget: int = 8192,
                    bf16: bool = False) -> Anchors:
    """Tokenise the anchors (canonical rows with ``uid``) and compute their zero-shot losses."""
    texts = [render(row, tokenizer, template) for row in rows]
    encoded = [e.truncate(max_length) for e in encode_many(tokenizer, [c for c, _ in texts], [a for _, a in texts])]
    keep = [i for i, e in enumerate(encoded) if e.answer]
    continuation = tokenizer([texts[i][0] for i in keep], add_special_tokens=False)["input_ids"] if keep else []
    zero_shot = [encoded[i] for i in keep]
    return Anchors(uids=[rows[i]["uid"] for i in keep], zero_shot=zero_shot,
                   continuation=[tuple(c) for c in continuation],
                   losses=answer_losses(model, zero_shot, token_budget=token_budget, bf16=bf16))


def demonstrations(tokenizer: Any, rows: Sequence[Mapping[str, Any]], *, template: NuggetsTemplate = "alpaca",
                   max_length: int = 512) -> list[tuple[int, ...]]:
    """Each candidate written out in full (prompt, answer, blank line), at most ``max_length`` ids."""
    texts = [context + answer + SEPARATOR for context, answer in (render(row, tokenizer, template) for row in rows)]
    return [tuple(ids[:max_length]) for ids in tokenizer(texts)["input_ids"]]


def one_shot_losses(model: Any, demos: Sequence[tuple[int, ...]], anchors: Anchors, *, token_budget: int = 8192,
                    bf16: bool = False) -> np.ndarray:
    """``s_os(j | c)`` for every demonstration (rows) and anchor (columns): the anchor's zero-shot
    answer ids after the demonstration and the anchor's prompt, all pairs in one batched pass."""
    items = [Encoded(demo + cont, zs.answer) for demo in demos for cont, zs in zip(anchors.continuation,
                                                                                  anchors.zero_shot)]
    return answer_losses(model, items, token_budget=token_budget, bf16=bf16).reshape(len(demos), len(anchors.uids))


ANCHOR_MAX_LENGTH = 200  # the authors' code cuts each anchor (prompt + answer) at 200 tokens


def golden_score_signal(model: str, anchor_uids: Sequence[str], *, template: NuggetsTemplate = "alpaca",
                        max_length: int = 512, anchor_max_length: int = ANCHOR_MAX_LENGTH,
                        precision: Precision = "float32") -> Signal:
    """``golden_score`` of a candidate against one anchor set (its fingerprint is a parameter):
    demonstrations cut at ``max_length`` tokens, anchors at ``anchor_max_length``.
    Reads ``messages``, ``instruction``, ``input``; writes one float in [0, 1]."""
    return Signal("golden_score", {"model": model_identity(model), "template": template, "max_length": max_length,
                                   "anchor_max_length": anchor_max_length,
                                   "precision": precision, "anchors": fingerprint(list(anchor_uids)),
                                   "n_anchors": len(set(anchor_uids))}, version="1", kind="float")


def build_golden_score(signal: Signal, anchors: pl.DataFrame, token_budget: int = 8192) -> Compute:
    """The batch function of a ``golden_score`` signal: loads the model, computes the anchors'
    zero-shot losses once, then scores batches of candidates against every anchor."""
    p = signal.params
    if fingerprint(anchors["uid"]) != p["anchors"]:
        raise ValueError("these anchors are not the ones the golden_score signal was defined with")
    model, tokenizer = load_scoring_lm(p["model"], p["precision"])
    fmt, speed = {"template": p["template"], "max_length": p["max_length"]}, {
        "token_budget": token_budget, "bf16": p["precision"] == "bfloat16"}
    prepared = prepare_anchors(model, tokenizer, anchors.to_dicts(), template=p["template"],
                               max_length=p["anchor_max_length"], **speed)
    if not prepared.uids:
        raise ValueError(f"no anchor has an answer token within anchor_max_length={p['anchor_max_length']}")
    anchor_tokens = sum(len(c) + len(z.answer) for c, z in zip(prepared.continuation, prepared.zero_shot))

    def compute(batch: pl.DataFrame) -> BatchResult:
        demos = demonstrations(tokenizer, batch.to_dicts(), **fmt)
        one_shot = one_shot_losses(model, demos, prepared, **speed)
        wins = one_shot < prepared.losses[None, :]
        outcomes = [Outcome(value=float(w.mean()),
                            raw=json.dumps({"anchors_improved": int(w.sum()), "anchors": len(prepared.uids),
                                            "mean_loss_change": round(float((o - prepared.losses).mean()), 6)}))
                    for w, o in zip(wins, one_shot)]
        tokens = sum(len(d) * len(prepared.uids) + anchor_tokens for d in demos)
        return BatchResult(outcomes, {"prompt_tokens": float(tokens)})

    return compute
