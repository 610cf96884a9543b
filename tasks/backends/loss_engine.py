"""The loss engine: answer-token losses and last-layer embeddings of a causal LM, batched.

Answer loss (the ``s`` of IFD, Nuggets, prompt uncertainty and the reference loss of
evaluate-subset)::

    s(A | C) = - (1 / |A|) * sum_{t in A} log p(a_t | C, a_<t)

the mean token cross-entropy over the answer tokens ``A`` (the last assistant turn), with the
context ``C`` in front of them: the rendered prompt (conditioned, ``s(A|Q)``) or only a bare
response header (unconditioned, ``s(A)``). Labels are -100 everywhere before the answer.

Exact masks. The answer starts where the context's own tokens end: the context and context+answer
are tokenised, and when the context's ids are a prefix of the full ids the answer is the rest.
When they are not (the tokenizer merges the context's last characters with the answer's first,
e.g. a context ending in a space), the sequence is built as context ids + answer ids tokenised on
their own, so that no token straddles the boundary; either way no context token is ever scored.
An empty context gets the tokenizer's BOS (else EOS) token so that the first answer token is
predicted from something (the instruction perplexity of ``prompt_loss``). The unconditioned answer
of ``template="none"`` is the exception (Superfiltering's ``s(A)``): it starts from what the
tokenizer itself puts before any text (Llama's ``<s>``), and where that is nothing (GPT-2,
SmolLM2, whose BOS ``<|im_start|>`` is a chat role token and not a neutral start), the answer's
first token is context, unscored, as in Superfiltering's code.

Same answer tokens in both conditions (the IFD Cherry variant): :func:`example_losses` takes the
answer ids from the conditioned rendering, keeps the first ``max_length - len(context)`` of them
(the whole prompt always stays), and scores exactly those ids in the unconditioned condition too.
Cherry's code gets close by truncating the unconditioned text to ``max_length - len(prompt) + 4``
tokens; here it is exact.

Templates (``template=``):

- ``chat``: the model's chat template; context = the conversation before the last assistant turn
  rendered with the generation prompt; unconditioned context = the template's assistant header
  alone (plus BOS text where the template starts with it). Default.
- ``alpaca``: the Stanford Alpaca prompt (Taori et al. 2023), with a ``### Input:`` section where the
  record has an input, as used by Cherry LLM; unconditioned context = ``### Response:``. Earlier
  turns of a multi-turn record are written as Instruction/Response pairs; a system turn replaces
  the preamble.
- ``none``: plain text, ``instruction\\n[input\\n]`` (Superfiltering, for small base models such
  as GPT-2); unconditioned context = nothing (the answer alone, its first token unscored; see above).

Speed: sequences are sorted by length and packed into batches of at most ``token_budget`` padded
tokens; padding is on the right, so with a causal mask no real token sees a pad and no attention
mask is needed; the output layer runs only on the positions that predict answer tokens, in
chunks, so no ``batch x length x vocabulary`` logits tensor is ever made; all under
``torch.inference_mode`` and, optionally, bf16 autocast.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Template = Literal["chat", "alpaca", "none"]
Pooling = Literal["mean", "last"]

# Stanford Alpaca's prompt format (the preamble sentences and section headers are the published ones).
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                         "further context. Write a response that appropriately completes the request.")
ALPACA_RESPONSE = "### Response:"


@dataclass(frozen=True)
class Encoded:
    """One scored sequence: ``context`` ids (never scored) followed by ``answer`` ids (scored)."""

    context: tuple[int, ...]
    answer: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.context) + len(self.answer)

    def truncate(self, max_length: int | None) -> Encoded:
        """Keep the whole context and the first answer tokens that fit in ``max_length``."""
        if max_length is None or len(self) <= max_length:
            return self
        return Encoded(self.context, self.answer[: max(0, max_length - len(self.context))])


@dataclass(frozen=True)
class AnswerLoss:
    """What :func:`example_losses` returns per example. ``loss`` is None (with ``error``) when no
    answer token could be scored; ``truncated`` when fewer than ``answer_tokens_total`` were."""

    loss: float | None
    context_tokens: int
    answer_tokens: int
    answer_tokens_total: int
    error: str | None = None

    @property
    def truncated(self) -> bool:
        return self.answer_tokens < self.answer_tokens_total


# -- tokenising ------------------------------------------------------------------------------------


def _start_token(tokenizer: Any) -> int:
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start an empty context with")
    return int(token)


def encode_many(tokenizer: Any, contexts: Sequence[str], answers: Sequence[str], *,
                add_special_tokens: bool = True) -> list[Encoded]:
    """Tokenise (context, answer) pairs with an exact boundary (see the module docstring).

    ``add_special_tokens=False`` for text rendered by a chat template (it writes its own BOS).
    """
    if len(contexts) != len(answers):
        raise ValueError(f"{len(contexts)} contexts for {len(answers)} answers")
    if not contexts:
        return []
    ctx_ids = tokenizer(list(contexts), add_special_tokens=add_special_tokens)["input_ids"]
    full_ids = tokenizer([c + a for c, a in zip(contexts, answers)], add_special_tokens=add_special_tokens)["input_ids"]
    out: list[Encoded] = []
    alone: dict[int, list[int]] = {}
    split = [i for i, (c, f) in enumerate(zip(ctx_ids, full_ids)) if c and f[: len(c)] != c]
    if split:  # the context's tokens are not a prefix of the full text's: tokenise the answer on its own
        answers_alone = tokenizer([answers[i] for i in split], add_special_tokens=False)["input_ids"]
        alone = dict(zip(split, answers_alone))
    for i, (c, f) in enumerate(zip(ctx_ids, full_ids)):
        if not c:  # nothing to predict the first answer token from: start with BOS (or EOS)
            out.append(Encoded((_start_token(tokenizer),), tuple(f)))
        elif i in alone:
            out.append(Encoded(tuple(c), tuple(alone[i])))
        else:
            out.append(Encoded(tuple(c), tuple(f[len(c):])))
    return out


def encode(tokenizer: Any, context: str, answer: str, *, add_special_tokens: bool = True) -> Encoded:
    """One (context, answer) pair; see :func:`encode_many`. A caller with its own context (Nuggets'
    one-shot demonstration + the anchor's prompt) builds the text and passes it here."""
    return encode_many(tokenizer, [context], [answer], add_special_tokens=add_special_tokens)[0]


def context_ids(tokenizer: Any, context: str, *, add_special_tokens: bool = True) -> tuple[int, ...]:
    """The ids of a context alone (BOS/EOS when it is empty)."""
    ids = tokenizer(context, add_special_tokens=add_special_tokens)["input_ids"]
    return tuple(ids) if ids else (_start_token(tokenizer),)


# -- templates -------------------------------------------------------------------------------------


def _turns(row: Mapping[str, Any]) -> tuple[list[dict[str, str]], str]:
    """(the conversation before the last assistant turn, that turn's text or "")."""
    messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, ""


def _last_user(row: Mapping[str, Any], prompt: list[dict[str, str]]) -> tuple[str, str, list[dict[str, str]]]:
    """(instruction, input, earlier turns): an Alpaca record keeps its instruction/input split."""
    earlier = prompt[:-1] if prompt and prompt[-1]["role"] == "user" else prompt
    last = prompt[-1]["content"] if prompt and prompt[-1]["role"] == "user" else ""
    if row.get("input") and row.get("instruction"):
        return row["instruction"], row["input"], earlier
    return last, "", earlier


def alpaca_prompt(row: Mapping[str, Any]) -> str:
    """The Stanford Alpaca prompt of a canonical example, ending in ``### Response:``."""
    prompt, _ = _turns(row)
    instruction, input, earlier = _last_user(row, prompt)
    system = next((m["content"] for m in earlier if m["role"] == "system"), None)
    parts = [system if system is not None else (ALPACA_PREAMBLE_INPUT if input else ALPACA_PREAMBLE)]
    for m in earlier:
        if m["role"] == "user":
            parts.append(f"### Instruction:\n{m['content']}")
        elif m["role"] == "assistant":
            parts[-1] += f"\n\n{ALPACA_RESPONSE}{m['content']}"
    parts.append(f"### Instruction:\n{instruction}")
    if input:
        parts.append(f"### Input:\n{input}")
    return "\n\n".join(parts) + f"\n\n{ALPACA_RESPONSE}"


def plain_prompt(row: Mapping[str, Any]) -> str:
    """Superfiltering's plain prompt: every earlier turn, then ``instruction\\n[input\\n]``."""
    prompt, _ = _turns(row)
    instruction, input, earlier = _last_user(row, prompt)
    return "".join(f"{m['content']}\n" for m in earlier) + f"{instruction}\n" + (f"{input}\n" if input else "")


def chat_prompt(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> str:
    """The chat template's rendering of ``messages`` followed by the assistant header."""
    return tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False, add_generation_prompt=True)


def chat_answer_header(tokenizer: Any) -> str:
    """What the chat template writes before an answer with no conversation in front: the assistant
    header (the generation prompt), after the BOS text where the template starts with a BOS that
    is not itself the header's first token (Llama 3, Gemma; not ChatML, whose BOS opens every turn).
    A default system prompt that some templates add is left out: it is not part of ``A``'s context."""
    probe = [{"role": "user", "content": "x"}]
    with_header = chat_prompt(tokenizer, probe)
    without = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=False)
    if not with_header.startswith(without) or with_header == without:
        raise ValueError("cannot find the assistant header of this chat template (the generation prompt does not "
                         "extend the rendered conversation); use template='alpaca' or 'none'")
    header, bos = with_header[len(without):], tokenizer.bos_token or ""
    return (bos if bos and with_header.startswith(bos) and not header.startswith(bos) else "") + header


def render(row: Mapping[str, Any], tokenizer: Any, template: Template, *, conditioned: bool = True) -> tuple[str, str]:
    """(context, answer) texts of a canonical example under ``template``."""
    check_template(tokenizer, template)
    prompt, answer = _turns(row)
    if template == "chat":
        return (chat_prompt(tokenizer, prompt) if conditioned else chat_answer_header(tokenizer)), answer
    if template == "alpaca":
        return (alpaca_prompt(row) if conditioned else ALPACA_RESPONSE), answer
    return (plain_prompt(row) if conditioned else ""), answer


def check_template(tokenizer: Any, template: str) -> None:
    if template not in ("chat", "alpaca", "none"):
        raise ValueError(f"unknown template {template!r}: chat, alpaca or none")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("template='chat' needs a tokenizer with a chat template; use 'alpaca' or 'none'")


# -- batching and forward passes -------------------------------------------------------------------


def length_batches(lengths: Sequence[int], token_budget: int, max_padding: float = 0.25) -> Iterator[list[int]]:
    """Indices sorted by length (longest first), cut into batches whose padded size
    ``rows * longest`` stays within ``token_budget`` (a longer sequence still gets a batch alone)
    and in which no row is padded by more than ``max_padding`` of its batch's width (padding is
    wasted compute: on a CPU it costs as much as real tokens)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batch: list[int] = []
    for i in order:
        width = lengths[batch[0]] if batch else 0
        if batch and ((len(batch) + 1) * width > token_budget or lengths[i] < (1 - max_padding) * width):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _padded(seqs: Sequence[Sequence[int]], device: Any):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
    return ids.to(device)


def _autocast(model: Any, bf16: bool):
    import torch

    return torch.autocast(device_type=model.device.type, dtype=torch.bfloat16, enabled=bf16)


_CHUNK = 2048  # answer positions per output-layer chunk: bounds the (tokens x vocabulary) logits in memory
_head_ok: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _output_head(model: Any):
    """(decoder, output layer) when ``output_layer(decoder(x).last_hidden_state)`` is the model's
    logits (checked once per model on a short probe: it is not for models that scale or cap their
    logits after the output layer), else None."""
    import torch

    if model not in _head_ok:
        ok = None
        decoder, head = getattr(model, "get_decoder", lambda: None)(), model.get_output_embeddings()
        if decoder is not None and head is not None:
            probe = torch.arange(1, 9, device=model.device)[None, :]
            with torch.inference_mode():
                full = model(input_ids=probe, use_cache=False).logits
                mine = head(decoder(input_ids=probe, use_cache=False).last_hidden_state)
            if mine.shape == full.shape and torch.allclose(mine, full, atol=1e-5, rtol=1e-5):
                ok = (decoder, head)
        _head_ok[model] = ok
    return _head_ok[model]


def answer_losses(model: Any, items: Sequence[Encoded], *, token_budget: int = 8192, bf16: bool = False) -> np.ndarray:
    """Mean answer-token cross-entropy of each item (float64; NaN where the answer is empty).

    One forward pass per length-sorted batch; the result is in the order of ``items``. The output
    layer runs only on the positions that predict answer tokens, ``_CHUNK`` at a time (where the
    model allows, see :func:`_output_head`), so no ``batch x length x vocabulary`` tensor is made.
    """
    import torch
    import torch.nn.functional as F

    out = np.full(len(items), np.nan)
    scored = [i for i, it in enumerate(items) if it.answer]
    head = _output_head(model)
    with torch.inference_mode(), _autocast(model, bf16):
        for batch in length_batches([len(items[i]) for i in scored], token_budget):
            rows = [items[scored[b]] for b in batch]
            ids = _padded([r.context + r.answer for r in rows], model.device)
            # position p predicts token p + 1: the answer's tokens are predicted from context_len - 1 on
            first = min(len(r.context) for r in rows) - 1
            targets = torch.full((len(rows), ids.shape[1] - first), -100, dtype=torch.long)
            for k, r in enumerate(rows):
                start = len(r.context) - 1 - first
                targets[k, start : start + len(r.answer)] = torch.tensor(r.answer, dtype=torch.long)
            targets = targets.to(model.device)
            mask = targets != -100
            if head is not None:
                decoder, output = head
                states = decoder(input_ids=ids, use_cache=False).last_hidden_state[:, first:][mask]
                wanted = targets[mask]
                token_loss = torch.cat([
                    F.cross_entropy(output(states[c : c + _CHUNK]).float(), wanted[c : c + _CHUNK], reduction="none")
                    for c in range(0, len(wanted), _CHUNK)])
            else:
                keep = torch.arange(first, ids.shape[1], device=model.device)
                logits = model(input_ids=ids, logits_to_keep=keep, use_cache=False).logits
                token_loss = F.cross_entropy(logits[mask].float(), targets[mask], reduction="none")
            sums = torch.zeros(len(rows), dtype=torch.float64, device=token_loss.device)
            sums.index_add_(0, torch.nonzero(mask)[:, 0], token_loss.double())
            out[[scored[b] for b in batch]] = (sums / mask.sum(dim=1).double()).cpu().numpy()
    return out


def example_losses(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    conditioned: bool = True,
    template: Template = "chat",
    max_length: int = 2048,
    token_budget: int = 8192,
    bf16: bool = False,
) -> list[AnswerLoss]:
    """``s(A|Q)`` (``conditioned``) or ``s(A)`` for canonical examples (dicts with ``messages``,
    ``instruction``, ``input``), counting the same answer tokens in both conditions (but for
    ``template="none"``'s ``s(A)``, which leaves the first of them unscored when the tokenizer
    puts no start token before a text). An example
    that cannot be scored (no answer, no room for one, a template that rejects its turns) gets
    ``loss=None`` and its ``error``; the others are unaffected."""
    check_template(tokenizer, template)  # a wrong setting fails loudly, not as one error per example
    special = template != "chat"
    texts: list[tuple[str, str]] = []
    errors: list[str | None] = []
    for row in rows:
        try:
            texts.append(render(row, tokenizer, template, conditioned=True))
            errors.append(None)
        except Exception as e:  # e.g. a chat template that refuses a system turn
            texts.append(("", ""))
            errors.append(f"cannot render the example with template {template!r}: {e}")
    full = encode_many(tokenizer, [c for c, _ in texts], [a for _, a in texts], add_special_tokens=special)
    full = [Encoded((), ()) if err else e for e, err in zip(full, errors)]
    kept = [e.truncate(max_length) for e in full]
    if conditioned:
        items = kept
    elif template == "none":  # Superfiltering's s(A): the answer alone (see the module docstring)
        start = tuple(tokenizer("", add_special_tokens=True)["input_ids"])
        items = [Encoded(start, e.answer) if start else Encoded(e.answer[:1], e.answer[1:]) for e in kept]
    else:
        header = context_ids(tokenizer, render(rows[0], tokenizer, template, conditioned=False)[0],
                             add_special_tokens=special) if rows else ()
        items = [Encoded(header, e.answer) for e in kept]
    losses = answer_losses(model, items, token_budget=token_budget, bf16=bf16)
    results = []
    for e, k, item, loss, error in zip(full, kept, items, losses, errors):
        if error is None and not e.answer:
            error = "no answer to score (the example has no final assistant turn, or it is empty)"
        elif error is None and not k.answer:
            error = f"the prompt alone has {len(e.context)} tokens, which leaves no answer token within max_length"
        elif error is None and not item.answer:
            error = "a one-token answer has no token to score after its unscored first one"
        results.append(AnswerLoss(None if error else float(loss), len(item.context), len(k.answer), len(e.answer),
                                  error))
    return results


def hidden_states(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    pooling: Pooling = "mean",
    max_length: int = 512,
    token_budget: int = 8192,
    bf16: bool = False,
    add_special_tokens: bool = True,
) -> np.ndarray:
    """Last-layer hidden states of a causal LM, one float32 row per text: the mean over the text's
    tokens (DiverseEvol, Cherry's pre-experience clusters) or the last token's (DEITA). Texts are
    truncated to ``max_length`` tokens; not normalised."""
    import torch

    if pooling not in ("mean", "last"):
        raise ValueError(f"unknown pooling {pooling!r}: mean or last")
    ids = [tuple(x) or (_start_token(tokenizer),)
           for x in tokenizer(list(texts), add_special_tokens=add_special_tokens, truncation=True,
                              max_length=max_length)["input_ids"]]
    out = np.zeros((len(ids), model.config.hidden_size), dtype=np.float32)
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    with torch.inference_mode(), _autocast(model, bf16):
        for batch in length_batches([len(x) for x in ids], token_budget):
            seqs = [ids[i] for i in batch]
            states = base(input_ids=_padded(seqs, model.device), use_cache=False).last_hidden_state.float()
            lengths = torch.tensor([len(s) for s in seqs], device=states.device)
            if pooling == "mean":
                mask = (torch.arange(states.shape[1], device=states.device)[None, :] < lengths[:, None]).float()
                pooled = (states * mask[..., None]).sum(1) / lengths[:, None]
            else:
                pooled = states[torch.arange(len(seqs), device=states.device), lengths - 1]
            out[batch] = pooled.cpu().numpy()
    return out
