"""embed: one vector per example as a signal (reads ``messages`` and ``output``; writes a float32
vector).

``field`` picks the text: ``prompt`` (every turn before the last answer: the instruction and its
input), ``instruction`` (the instruction alone, without its input: MoDS), ``output`` (the last
answer), ``full`` (prompt, a blank line, answer) or ``chat`` (the whole conversation in the causal
LM's own chat template, so that the last token closes the last turn, as DEITA embeds conversations;
plain ``full`` text for a model without a template; causal-LM poolings only). ``pooling`` picks the
model kind:

- ``sentence``: a sentence encoder (:mod:`~sft_select.tasks.backends.encoders`, all-MiniLM-L6-v2 by
  default); rows are L2-normalised.
- ``mean`` / ``last``: last-layer hidden states of a causal LM
  (:func:`~sft_select.tasks.backends.loss_engine.hidden_states`), mean-pooled over the tokens (Coreset,
  DiverseEvol, Cherry's pre-experience) or the last token's (DEITA); L2-normalised when
  ``normalize``.

:func:`load_vectors` reads a filled signal back as one ``(n, d)`` float32 matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

import numpy as np
import polars as pl

from sft_select.settings import settings
from sft_select.storage import BatchResult, Signal
from sft_select.storage.examples import prompt_text
from sft_select.storage.signals import Compute
from sft_select.tasks.backends.models import FINETUNED, model_identity
from sft_select.tasks.finetune import FINISHED, FinetunedRef, finetuned_dir
from sft_select.tasks.signal_task import get_store, signal_task
from sft_select.tasks.lm_loss import by_length

Field = Literal["prompt", "instruction", "output", "full", "chat"]
Pooling = Literal["sentence", "mean", "last"]
VERSION = "1"


def embed_signal(model: str | None = None, *, field: Field = "full", max_tokens: int = 256,
                 pooling: Pooling = "sentence", normalize: bool = True) -> Signal:
    """The ``embed`` signal for these parameters. ``model`` defaults to ``settings().encoder`` for
    ``pooling="sentence"`` and to ``settings().local_llm`` for the causal-LM poolings. Sentence
    embeddings are always normalised (``normalize`` is ignored for them)."""
    if pooling == "sentence":
        if field == "chat":
            raise ValueError("field 'chat' (a conversation in a causal LM's chat template) needs pooling 'mean' or "
                             "'last'; a sentence encoder takes 'prompt', 'output' or 'full'")
        model, normalize = model or settings().encoder, True
    else:
        model = model or settings().local_llm
    return Signal("embed", {"model": model_identity(model), "field": field, "max_tokens": max_tokens,
                            "pooling": pooling, "normalize": normalize}, version=VERSION, kind="vector")


def texts_of(examples: pl.DataFrame, field: Field) -> list[str]:
    """The text of each example that ``field`` names."""
    if field == "output":
        return examples["output"].to_list()
    if field == "instruction":
        return examples["instruction"].to_list()
    prompts = [prompt_text({"messages": m}) for m in examples["messages"].to_list()]
    if field == "prompt":
        return prompts
    if field == "full":
        return [f"{p}\n\n{o}" if o else p for p, o in zip(prompts, examples["output"].to_list())]
    raise ValueError(f"unknown field {field!r}: prompt, instruction, output or full")


def build_embed(signal: Signal) -> Compute:
    """The batch function of an ``embed`` signal (the model is loaded once, on the first batch)."""
    p = signal.params
    if p["pooling"] == "sentence":
        from sft_select.tasks.backends.encoders import encode

        def texts(batch: pl.DataFrame) -> list[str]:
            return texts_of(batch, p["field"])

        def vectors(texts: list[str]) -> np.ndarray:
            return encode(texts, p["model"], max_tokens=p["max_tokens"])
    else:
        from sft_select.tasks.backends.loss_engine import hidden_states
        from sft_select.tasks.backends.models import load_causal_lm

        model, tokenizer = load_causal_lm(p["model"])
        templated = p["field"] == "chat" and bool(getattr(tokenizer, "chat_template", None))

        def texts(batch: pl.DataFrame) -> list[str]:
            if templated:  # ends on the template's end-of-turn token (DEITA's ends on </s>), not a newline after it
                return [tokenizer.apply_chat_template(m, tokenize=False).rstrip() for m in batch["messages"].to_list()]
            return texts_of(batch, "full" if p["field"] == "chat" else p["field"])

        def vectors(texts: list[str]) -> np.ndarray:
            v = hidden_states(model, tokenizer, texts, pooling=p["pooling"], max_length=p["max_tokens"],
                              add_special_tokens=not templated)  # a template writes its own special tokens
            return l2_normalise(v) if p["normalize"] else v

    def compute(batch: pl.DataFrame) -> BatchResult:
        return BatchResult.of(list(vectors(texts(batch))))

    return compute


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


embed = signal_task("embed", build_embed, batch_size=256, order_by=by_length)


def load_vectors(signal: Signal, uids: Sequence[str] | pl.Series) -> tuple[list[str], np.ndarray]:
    """(uids that have a vector, in the given order; their vectors as a float32 ``(n, d)`` matrix).
    Examples whose embedding failed or is missing are left out."""
    uids = list(uids)
    try:
        matrix, present = get_store().signals.matrix(signal, uids)
    except KeyError:
        return [], np.zeros((0, 0), dtype=np.float32)
    return [u for u, ok in zip(uids, present) if ok], (matrix if present.all() else matrix[present])


# -- the pool embedded by a fine-tuned model (DiverseEvol) --------------------------------------------


def finetuned_embed_signal(model: FinetunedRef, max_tokens: int = 512) -> Signal:
    """The pool embedding of round t: mean-pooled last hidden states of the fine-tuned model, not
    normalised (the paper's k-center runs on the raw averages). The model is named by its content
    key, never by where its folder is."""
    return embed_signal(FINETUNED + model.key, field="full", max_tokens=max_tokens, pooling="mean", normalize=False)


def _build_finetuned_embed(signal: Signal) -> Compute:
    """The ``embed`` batch function, loading the fine-tuned folder that the signal's model key names."""
    folder = finetuned_dir(str(signal.params["model"]).removeprefix(FINETUNED))
    if not (folder / FINISHED).exists():
        raise FileNotFoundError(f"{signal.id}: fine-tuned model {folder.name} is not in the model cache")
    return build_embed(replace(signal, params={**signal.params, "model": str(folder)}))


embed_finetuned = signal_task("embed-finetuned", _build_finetuned_embed, batch_size=256, order_by=by_length)
