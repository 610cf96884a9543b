"""LLM judgements as signals: a prompt, the model's raw text, and a parser.

A :class:`Prompt` is everything a judgement depends on: a system message, a template over the
example's fields, generation settings and ``parse(raw) -> value``. :func:`llm_signal` turns a
prompt and a backend into a :class:`~sft_select.storage.Signal` whose parameters name the model,
the prompt (name, version and a hash of its wording), temperature and max tokens; its ``version``
is the parser's. :data:`score_with_llm` fills such a signal through the one signal store, so a
rating paid for once is found again by every method and every dataset holding the example.

:func:`stored_chat` is the same store for free-form answers that belong to no example (an
evaluation's generations and judge verdicts): the ``chat`` signal of a model and generation
settings holds each conversation's answer under the conversation's hash.

Every row keeps the raw model text. A backend failure or a parse failure is stored as an error
(with the raw text), never as a default value (DEITA's public scorer returned 3.0 for every
unparseable answer). :func:`reparse` applies a new parser to the stored raw text, writing a new
signal version without a single model call.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import polars as pl

from sft_select.storage import BatchResult, Outcome, Signal
from sft_select.storage.examples import exchanges, prompt_text
from sft_select.storage.signals import Compute, Kind, canonical_json
from sft_select.tasks.backends.chat import LLM, ChatResult, Conversation, get_llm, usage_of
from sft_select.tasks.signal_task import get_store, signal_task

PROMPTS: dict[tuple[str, str, str], Prompt] = {}


@dataclass(frozen=True)
class Prompt:
    """A judge prompt. ``template`` (and ``system``) are ``str.format`` templates over the fields
    ``instruction``, ``input``, ``input_or_none`` (the input, or "(none)"), ``output``, ``prompt``
    (every turn before the last answer, as text) and ``source``.

    ``parse(raw)`` returns the value or raises ``ValueError``; ``raw`` is the completion text, or,
    when ``top_logprobs`` is set, JSON ``{"text": ..., "top_logprobs": [{token: logprob}, ...]}``;
    ``labels`` (the score tokens of an expected score) are in every position's log-probs whatever
    their rank where the backend can give them (the local one), as DEITA's scorer reads them.
    Bump ``version`` when the wording or generation settings change (the wording's hash is part of
    the signal's identity anyway) and ``parser_version`` when ``parse`` changes (then
    :func:`reparse` rebuilds the values from the stored raw text).

    A prompt registers itself by ``(name, version, parser_version)`` so that a stored signal finds
    its prompt again.
    """

    name: str
    version: str
    template: str
    parse: Callable[[str], Any]
    system: str | None = None
    parser_version: str = "1"
    max_tokens: int = 256
    temperature: float = 0.0
    top_logprobs: int | None = None
    labels: tuple[str, ...] = ()
    kind: Kind = "float"
    rubric: str = ""  # the published rubric the wording follows (documentation; not part of the identity)

    def __post_init__(self) -> None:
        key = (self.name, self.version, self.parser_version)
        known = PROMPTS.get(key)
        if known is not None and known.sha != self.sha:
            raise ValueError(f"prompt {self.name!r} version {self.version!r} is already defined with other "
                             "wording: bump its version")
        PROMPTS[key] = self

    @property
    def sha(self) -> str:
        """Hash of the wording and generation settings (part of the signal identity)."""
        settings = [self.system, self.template, self.max_tokens, self.temperature, self.top_logprobs]
        text = json.dumps(settings + ([list(self.labels)] if self.labels else []))  # no labels: identities as before
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def render(self, row: Mapping[str, Any]) -> Conversation:
        """The conversation sent to the judge for one example row."""
        fields = {
            "instruction": row.get("instruction") or "",
            "input": row.get("input") or "",
            "input_or_none": row.get("input") or "(none)",
            "output": row.get("output") or "",
            "prompt": prompt_text(row) if row.get("messages") is not None else row.get("instruction") or "",
            "source": row.get("source") or "",
        }
        return self.conversation(**fields)

    def conversation(self, **fields: Any) -> Conversation:
        """The system and user messages with the template's fields filled in."""
        messages = [{"role": "system", "content": self.system.format(**fields)}] if self.system else []
        return messages + [{"role": "user", "content": self.template.format(**fields)}]

    def outcome(self, result: ChatResult) -> Outcome | None:
        """A chat result as a stored outcome: the value, or the error with the raw text; ``None``
        when the service failed (the example was not answered and is charged nothing)."""
        if result.service:
            return None
        if result.error is not None:
            return Outcome(error=f"llm: {result.error}", final=result.final)
        raw = result.text or ""
        if self.top_logprobs:
            raw = json.dumps({"text": raw, "top_logprobs": result.top_logprobs or []}, ensure_ascii=False)
        return self.parse_raw(raw)

    def parse_raw(self, raw: str) -> Outcome:
        try:
            return Outcome(value=self.parse(raw), raw=raw)
        except ValueError as e:
            # a greedy answer is the same when asked again: a parse failure at temperature 0 is final
            return Outcome(error=f"parse: {e}", raw=raw, final=self.temperature == 0)


def llm_signal(prompt: Prompt, llm: LLM | str | None = None) -> Signal:
    """The signal of ``prompt`` judged by ``llm`` (a backend, a spec for :func:`get_llm`, or the default)."""
    name = llm.name if isinstance(llm, LLM) else get_llm(llm).name
    params = {"model": name, "prompt": prompt.name, "prompt_version": prompt.version, "prompt_sha": prompt.sha,
              "temperature": prompt.temperature, "max_tokens": prompt.max_tokens,
              "top_logprobs": prompt.top_logprobs}
    return Signal(prompt.name, params, version=prompt.parser_version, kind=prompt.kind)


def prompt_of(signal: Signal) -> Prompt:
    """The registered prompt a signal was made from (its module must have been imported)."""
    key = (str(signal.params.get("prompt")), str(signal.params.get("prompt_version")), signal.version)
    prompt = PROMPTS.get(key)
    if prompt is None:
        raise KeyError(f"{signal.id}: no prompt {key[0]!r} version {key[1]!r} with parser version {key[2]!r} is "
                       "defined in this process (import the module that defines it)")
    if prompt.sha != signal.params.get("prompt_sha"):
        raise ValueError(f"{signal.id}: prompt {key[0]!r} version {key[1]!r} has changed wording since the "
                         "signal was made: bump the prompt's version")
    return prompt


def llm_batch(prompt: Prompt, llm: LLM) -> Compute:
    """The batch function: render each row, one batched ``llm.chat``, parse; usage from the results."""

    def compute(batch: pl.DataFrame) -> BatchResult:
        results = llm.chat([prompt.render(row) for row in batch.iter_rows(named=True)],
                           temperature=prompt.temperature, max_tokens=prompt.max_tokens,
                           top_logprobs=prompt.top_logprobs, label_tokens=prompt.labels)
        return BatchResult([prompt.outcome(r) for r in results], usage_of(results), abort=service_failure(llm, results))

    return compute


def service_failure(llm: LLM, results: list[ChatResult]) -> str | None:
    """Why the batch must stop the run (the first error about the service), or ``None``."""
    reason = next((r.error for r in results if r.service), None)
    return f"{llm.name}: {reason}" if reason else None


def llm_batch_of(signal: Signal) -> Compute:
    """The batch function of an :func:`llm_signal`: its prompt, judged by the backend it names."""
    return llm_batch(prompt_of(signal), get_llm(str(signal.params["model"])))


def estimate_llm(signal: Signal, rows: pl.DataFrame) -> dict[str, float]:
    """What judging ``rows`` would cost: one call each, prompt tokens estimated as characters / 4,
    completion tokens at most ``max_tokens``, priced where the backend has a price."""
    prompt, llm = prompt_of(signal), get_llm(str(signal.params["model"]))
    prompt_tokens = sum(len(m["content"]) for row in rows.iter_rows(named=True) for m in prompt.render(row)) / 4
    completion_tokens = float(prompt.max_tokens * rows.height)
    price = getattr(llm, "price_per_mtok", None) or (0.0, 0.0)
    return {"calls": float(rows.height), "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "cost_usd": (prompt_tokens * price[0] + completion_tokens * price[1]) / 1e6}


score_with_llm = signal_task("score_with_llm", llm_batch_of, batch_size=32, estimate=estimate_llm)
"""Prefect task ``(signal, dataset) -> SignalRef``: fill an :func:`llm_signal` for a dataset."""

score_exchanges_with_llm = signal_task("score_exchanges_with_llm", llm_batch_of, batch_size=32, estimate=estimate_llm,
                                       rows=exchanges)
"""Prefect task ``(signal, dataset) -> SignalRef``: fill an :func:`llm_signal` for every exchange (user
turn and its answer) of the dataset's conversations, each judged alone and stored under the
exchange's own content id (:func:`~sft_select.storage.examples.exchanges`; a single-turn example
is its own exchange)."""


def chat_signal(model: str, *, temperature: float, max_tokens: int) -> Signal:
    """The stored answers of ``model`` (an ``LLM.name`` or a model identity) at these settings."""
    return Signal("chat", {"model": model, "temperature": temperature, "max_tokens": max_tokens}, kind="text")


def conversation_uid(conversation: Conversation) -> str:
    """The key of a conversation in a ``chat`` signal: sha256 of its canonical JSON."""
    return hashlib.sha256(canonical_json(list(conversation)).encode()).hexdigest()


def stored_chat(llm: LLM, conversations: list[Conversation], *, max_tokens: int, temperature: float = 0.0,
                model: str | None = None, batch_size: int = 32) -> list[ChatResult]:
    """``llm.chat`` through the signal store, for answers that must not be paid for twice: the
    conversations without a stored answer are sent ``batch_size`` at a time, each batch on disk
    before the next starts, so a killed evaluation resumes where it stopped and a repeated one
    makes no call. ``model`` names the answering model in the signal when ``llm.name`` does not
    (a fine-tuned folder). Meant for temperature 0, where an answer is a function of the model,
    the conversation and the settings. Failed calls come back with ``error`` set and are asked
    again on the next call (up to the store's attempts)."""
    signal = chat_signal(model or llm.name, temperature=temperature, max_tokens=max_tokens)
    uids = [conversation_uid(c) for c in conversations]
    frame = pl.DataFrame({"uid": uids, "conversation": [canonical_json(list(c)) for c in conversations]})

    def compute(batch: pl.DataFrame) -> BatchResult:
        results = llm.chat([json.loads(c) for c in batch["conversation"]], temperature=temperature,
                           max_tokens=max_tokens)
        return BatchResult([None if r.service else Outcome(value=r.text) if r.error is None
                            else Outcome(error=r.error, final=r.final) for r in results],
                           usage_of(results), abort=service_failure(llm, results))

    store = get_store()
    # similar lengths together: less padding in a local model's batch, the slowest last
    store.signals.fill(signal, frame, compute, batch_size=batch_size,
                       order_by=lambda todo: todo.sort(pl.col("conversation").str.len_bytes(), maintain_order=True))
    stored = {row["uid"]: row for row in store.signals.read(signal, uids).iter_rows(named=True)}
    return [ChatResult(text=stored[u]["value"]) if stored[u]["error"] is None else ChatResult(error=stored[u]["error"])
            for u in uids]


def reparse(signal: Signal, prompt: Prompt, uids: Iterable[str] | None = None) -> Signal:
    """Parse the raw text stored for ``signal`` again with ``prompt.parse`` into the signal's next
    version (``prompt.parser_version``), without calling the model. Rows whose model call failed
    (no raw text) are left out, so filling the new signal later asks the model only for those."""
    if (signal.params.get("prompt"), signal.params.get("prompt_version"), signal.params.get("prompt_sha")) != (
            prompt.name, prompt.version, prompt.sha):
        raise ValueError(f"{signal.id} was not made with prompt {prompt.name!r} version {prompt.version!r}")
    target = replace(signal, version=prompt.parser_version, kind=prompt.kind)
    if target.id == signal.id:
        raise ValueError(f"{signal.id}: bump the prompt's parser_version to re-parse into a new signal version")
    store = get_store()
    stored = store.signals.read(signal, list(uids) if uids is not None else None)
    stored = stored.filter(pl.col("raw").is_not_null()).select("uid", "raw")
    store.signals.fill(target, stored, lambda batch: BatchResult([prompt.parse_raw(r) for r in batch["raw"]],
                                                                 {"calls": 0.0}), batch_size=10_000)
    return target


def reparse_newest(signal: Signal) -> tuple[Signal, Signal]:
    """:func:`reparse` ``signal`` with the newest parser registered for its prompt (the modules
    defining prompts must have been imported). Returns the signal and its re-parsed version."""
    name, version, sha = (signal.params.get(k) for k in ("prompt", "prompt_version", "prompt_sha"))
    if name is None:
        raise ValueError(f"{signal.id} is not an LLM judgement: it has no prompt to parse with")
    newer = sorted((p for (n, v, _), p in PROMPTS.items() if (n, v) == (name, version) and p.sha == sha),
                   key=lambda p: (len(p.parser_version), p.parser_version))
    if not newer or newer[-1].parser_version == signal.version:
        raise ValueError(f"{signal.id}: no parser newer than version {signal.version!r} is defined for prompt "
                         f"{name!r}; change the parser and bump its parser_version first")
    return signal, reparse(signal, newer[-1])


# -- parsers -----------------------------------------------------------------------------------------


def first_number(text: str, *, low: float, high: float) -> float:
    """The number the answer starts with (its first line, "Score: 4.5", "4/5", "**5**" allowed), which
    must lie in ``[low, high]``."""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    match = re.match(r"^[\s*#>_`\"']*(?:(?:score|rating|accuracy|helpfulness)\s*[:=]?\s*)?[*_`\"']*"
                     r"([+-]?\d+(?:\.\d+)?)", line, flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"no score at the start of the first line: {line[:80]!r}")
    value = float(match.group(1))
    if not low <= value <= high:
        raise ValueError(f"score {value:g} outside [{low:g}, {high:g}]")
    return value


_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)```", flags=re.DOTALL)


def parse_json_answer(text: str) -> Any:
    """The JSON object or list a judge was asked to answer with, read from its raw text.

    Models wrap JSON in other text, so this takes the whole answer if it is JSON, else the first
    code fence (```json ... ```) that holds JSON, else the first object or list that parses when
    decoding from a ``{`` or ``[`` (leading and trailing prose are fine). After a failed decode the
    scan resumes where the decoder stopped, never inside the broken JSON: a list cut off at
    ``max_tokens`` is an error, not its first complete item. Raises ``ValueError`` saying why: an
    empty answer, no object or list at all (a refusal, say), or JSON that does not parse (cut off,
    single quotes, ...) with the decoder's message and the answer's start. Never returns a default."""
    stripped = (text or "").strip()
    if not stripped:
        raise ValueError("empty answer: no JSON")
    for candidate in [stripped, *(b.strip() for b in _FENCE.findall(stripped))]:
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict | list):
            return value
    decoder, error, resume = json.JSONDecoder(), None, 0
    for i, ch in enumerate(stripped):
        if ch not in "{[" or i < resume:
            continue
        try:
            return decoder.raw_decode(stripped, i)[0]
        except json.JSONDecodeError as e:
            error = error or e
            resume = max(e.pos, i + 1)
    snippet = stripped[:80] + ("..." if len(stripped) > 80 else "")
    if error is None:
        raise ValueError(f"no JSON object or list in the answer: {snippet!r}")
    raise ValueError(f"JSON does not parse ({error.msg}, character {error.pos}): {snippet!r}")


def expected_score(top_logprobs: Mapping[str, float], scores: Iterable[int] = range(1, 7)) -> float:
    """DEITA's expected score (Liu et al. 2023): with p(k) the probability of the token "k" at the
    first generated position, renormalised over the score tokens, ``sum_k k * p(k)``. Tokens that
    differ only by surrounding spaces (" 5", "5") are pooled. Raises ``ValueError`` when no score
    token is among the top log-probs."""
    mass: dict[int, float] = {}
    wanted = {str(k): k for k in scores}
    for token, logprob in top_logprobs.items():
        k = wanted.get(token.strip())
        if k is not None:
            mass[k] = mass.get(k, 0.0) + math.exp(logprob)
    total = sum(mass.values())
    if total <= 0:
        raise ValueError(f"none of the tokens {sorted(wanted)} among the top log-probs {list(top_logprobs)[:10]}")
    return sum(k * p for k, p in mass.items()) / total


def expected_score_parser(scores: Iterable[int] = range(1, 7)) -> Callable[[str], float]:
    """The parser of a prompt with ``top_logprobs`` set: :func:`expected_score` over ``scores`` at the
    first generated position."""
    scores = tuple(scores)

    def parse(raw: str) -> float:
        positions = json.loads(raw).get("top_logprobs") or []
        if not positions:
            raise ValueError("the backend returned no log-probs")
        return expected_score(positions[0], scores)

    return parse


parse_expected_score = expected_score_parser()
"""DEITA's 1-6 expected score at the first position."""


__all__ = ["PROMPTS", "Prompt", "chat_signal", "conversation_uid", "estimate_llm", "expected_score",
           "expected_score_parser", "first_number", "llm_batch", "llm_batch_of", "llm_signal", "parse_expected_score",
           "parse_json_answer", "prompt_of", "reparse", "reparse_newest", "score_exchanges_with_llm", "score_with_llm",
           "service_failure", "stored_chat"]
