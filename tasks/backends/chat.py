"""The one LLM interface: batched chat completion, with token log-probs where the backend has them.

Two backends implement it:

- :class:`OpenAIChat`: any OpenAI-compatible HTTP server (OpenAI, vLLM, llama.cpp server, Ollama,
  TGI) through the ``openai`` package's async client, with bounded concurrency, a requests- and
  tokens-per-minute limiter, retries with jittered exponential backoff (honouring ``Retry-After``)
  and token / cost accounting.
- :class:`LocalChat`: a transformers causal LM (the embedded default is SmolLM2-135M-Instruct),
  the model's chat template, batched greedy generation with left padding.

``chat`` never raises for one bad example: a conversation that still fails after the retries comes
back as a :class:`ChatResult` with ``error`` set. An error about the *service* rather than the
example (a refused key, an unknown model, a server that cannot be reached, a run of consecutive
failures: the circuit breaker) comes back with ``service`` set, and the rest of the batch is
abandoned at once, so that the caller stops the run instead of charging examples for it.
``LLM.name`` ("openai:gpt-4o-mini@api.openai.com/v1", "local:smollm2-135m-instruct") is the
backend's identity in signal parameters, and ``get_llm(name)`` builds the same backend again from it.

The API key is held as a ``SecretStr``, handed only to the HTTP client, and scrubbed from every
error text; it never appears in a repr, a log line, a result or the catalog.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr

from sft_select.settings import settings

log = logging.getLogger("sft_select")

Conversation = list[dict[str, str]]
USAGE_KEYS = ("calls", "retries", "prompt_tokens", "completion_tokens", "cost_usd")


@dataclass
class ChatResult:
    """One conversation's completion, or why there is none.

    ``top_logprobs`` (when asked for and the backend has them): one dict per generated position,
    token text -> log-probability, for the ``top_logprobs`` most likely tokens at that position.
    ``calls``/``retries``: requests that completed / attempts repeated after a transient failure.
    ``service``: the error is about the service (key, endpoint, outage), not this conversation;
    ``final``: the error is about this conversation and asking again cannot change it (HTTP 400).
    """

    text: str | None = None
    error: str | None = None
    service: bool = False
    final: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    top_logprobs: list[dict[str, float]] | None = None
    calls: int = 0
    retries: int = 0
    cost_usd: float = 0.0


def _top_dict(pairs: list[tuple[str, float]]) -> dict[str, float]:
    """Token -> log-prob, most likely first; where two token ids print the same, the likelier wins."""
    top: dict[str, float] = {}
    for token, logprob in sorted(pairs, key=lambda p: -p[1]):
        top.setdefault(token, logprob)
    return top


def usage_of(results: Sequence[ChatResult]) -> dict[str, float]:
    """What a batch cost: ``calls, retries, prompt_tokens, completion_tokens, cost_usd`` summed."""
    return {k: float(sum(getattr(r, k) for r in results)) for k in USAGE_KEYS}


class LLM(ABC):
    """Batched chat completion. Subclasses implement :meth:`_chat`; :meth:`chat` keeps the totals."""

    name: str

    def __init__(self) -> None:
        self._usage_lock = threading.Lock()
        self.usage: dict[str, float] = dict.fromkeys(USAGE_KEYS, 0.0)

    def chat(self, conversations: Sequence[Conversation], *, temperature: float = 0.0, max_tokens: int = 256,
             top_logprobs: int | None = None, label_tokens: Sequence[str] = ()) -> list[ChatResult]:
        """One result per conversation, in order. ``top_logprobs=k`` asks for the k most likely
        tokens at every generated position (``None``: not asked); ``label_tokens`` are added to them
        at every position whatever their rank, where the backend can (the local one; an
        OpenAI-compatible server returns only its top ones)."""
        if not conversations:
            return []
        results = self._chat(list(conversations), temperature=temperature, max_tokens=max_tokens,
                             top_logprobs=top_logprobs, label_tokens=tuple(label_tokens))
        with self._usage_lock:
            for k, v in usage_of(results).items():
                self.usage[k] += v
        return results

    @abstractmethod
    def _chat(self, conversations: list[Conversation], *, temperature: float, max_tokens: int,
              top_logprobs: int | None, label_tokens: tuple[str, ...] = ()) -> list[ChatResult]: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


# -- OpenAI-compatible HTTP --------------------------------------------------------------------------


class RateLimiter:
    """Requests- and tokens-per-minute limits as two token buckets, each refilled continuously and
    holding at most one second's allowance (so a fresh limiter does not burst a minute's worth).
    A request reserves one request and its estimated tokens before it is sent; waiters are served
    in arrival order."""

    def __init__(self, rpm: float | None = None, tpm: float | None = None):
        self._rates = [(r / 60.0 if r else None) for r in (rpm, tpm)]
        self._capacity = [max(1.0, r) if r else math.inf for r in self._rates]
        self._level = list(self._capacity)
        self._stamp = time.monotonic()
        self._lock: asyncio.Lock | None = None

    @property
    def active(self) -> bool:
        return any(self._rates)

    async def acquire(self, tokens: float) -> None:
        if not self.active:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        want = [1.0, tokens]
        async with self._lock:
            while True:
                now = time.monotonic()
                for i, rate in enumerate(self._rates):
                    if rate:
                        self._level[i] = min(self._capacity[i], self._level[i] + (now - self._stamp) * rate)
                self._stamp = now
                need = [min(w, c) for w, c in zip(want, self._capacity)]
                waits = [(n - lvl) / r for n, lvl, r in zip(need, self._level, self._rates) if r and lvl < n]
                if not waits:
                    for i, rate in enumerate(self._rates):
                        if rate:
                            self._level[i] -= need[i]
                    return
                await asyncio.sleep(max(waits))


def retry_after_s(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class Breaker:
    """The circuit breaker of one batch: it trips on the first error about the service (HTTP 401,
    403, 404, an exhausted quota, a server that refuses connections, rate limits that outlast the
    retries) or after ``threshold`` consecutive failed attempts (5xx, timeouts) with no success in
    between, and then cancels every request of the batch still waiting or in flight."""

    def __init__(self, threshold: int):
        self.threshold = threshold
        self.failing: list[int] = []  # the conversations of the current run of failures, one entry per failure
        self.reason: str | None = None
        self.tasks: list[asyncio.Task] = []

    def success(self) -> None:
        self.failing.clear()

    def failure(self, error: str) -> None:
        """One failed attempt. A run of failures trips the breaker only when it spans several
        conversations (or the batch has one): one conversation the server keeps failing on, while
        others succeed, is that conversation's error."""
        self.failing.append(id(asyncio.current_task()))
        if len(self.failing) >= self.threshold and (len(set(self.failing)) > 1 or len(self.tasks) == 1):
            self.trip(f"{len(self.failing)} requests failed in a row, the last with {error}")

    def trip(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            me = asyncio.current_task()
            for t in self.tasks:
                if t is not me:
                    t.cancel()


def endpoint_of(base_url: str | None) -> str:
    """The server part of a judge's identity: host, port and path of ``base_url`` (never its
    credentials), or OpenAI's own API."""
    if not base_url:
        return "api.openai.com/v1"
    url = urlsplit(base_url)
    host = url.hostname or ""
    return f"{host}{f':{url.port}' if url.port else ''}{url.path.rstrip('/')}"


class OpenAIChat(LLM):
    """Chat completions from an OpenAI-compatible server.

    - at most ``max_concurrency`` requests in flight, ``rpm``/``tpm`` limits (see :class:`RateLimiter`;
      a request's tokens are estimated as characters / 4 plus ``max_tokens``);
    - 429, 408, 409, 5xx, timeouts and connection errors are retried up to ``max_retries`` times,
      waiting ``Retry-After`` when the server says, else ``backoff_s * 2**attempt`` with jitter
      (half fixed, half random), capped at ``max_backoff_s``. The client's own retries are off, so
      every retry is ours and counted;
    - ``price_per_mtok = (input, output)`` in USD per million tokens turns usage into ``cost_usd``;
    - a request stops retrying once its batch has waited ``retry_budget_s``: one failing example
      holds its batch for a bounded time, and fails alone (asked again on a later attempt);
    - errors about the service trip the batch's :class:`Breaker` (``breaker_threshold``
      consecutive failures, or one refused key, unknown model or unreachable server).

    ``endpoint`` (default: from ``base_url``) joins the model in the backend's ``name``, so the
    same model name on another server is another judge; set it (``SFT_SELECT_OPENAI_ENDPOINT``) to
    declare that two servers serve the same model and share their ratings.

    The batch runs on a private event loop in a background thread, so :meth:`chat` may be called
    from any thread (Prefect runs tasks in worker threads), also while another loop is running.
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: SecretStr | str | None = None,
        max_concurrency: int = 16,
        rpm: float | None = None,
        tpm: float | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 6,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        price_per_mtok: tuple[float, float] | None = None,
        retry_budget_s: float = 30.0,
        breaker_threshold: int = 5,
        endpoint: str | None = None,
    ):
        super().__init__()
        if isinstance(api_key, str):
            api_key = SecretStr(api_key)
        self.model = model
        self.endpoint = endpoint or endpoint_of(base_url)
        self.name = f"openai:{model}@{self.endpoint}"
        self.base_url = base_url
        self.retry_budget_s = retry_budget_s
        self.breaker_threshold = breaker_threshold
        self._api_key = api_key
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.price_per_mtok = price_per_mtok
        self._limiter = RateLimiter(rpm, tpm)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._semaphore: asyncio.Semaphore | None = None
        self._start_lock = threading.Lock()

    # the event loop thread and the client living on it

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._start_lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name=f"llm-{self.model}", daemon=True)
                self._thread.start()
            return self._loop

    def _ensure_client(self) -> Any:
        if self._client is None:
            from openai import AsyncOpenAI

            key = self._api_key.get_secret_value() if self._api_key else "none"
            self._client = AsyncOpenAI(api_key=key, base_url=self.base_url, timeout=self.timeout_s, max_retries=0)
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
        return self._client

    def close(self) -> None:
        """Close the HTTP client and stop the loop thread (a later ``chat`` starts them again)."""
        with self._start_lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None:
            return
        if self._client is not None:
            asyncio.run_coroutine_threadsafe(self._client.close(), loop).result(timeout=10)
            self._client = None
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()

    def _chat(self, conversations: list[Conversation], *, temperature: float, max_tokens: int,
              top_logprobs: int | None, label_tokens: tuple[str, ...] = ()) -> list[ChatResult]:
        # label_tokens: the API has no way to ask for given tokens' log-probs; the top ones are what it returns
        if self._api_key is None and self.base_url is None:
            raise ValueError("the OpenAI backend needs OPENAI_API_KEY (or OPENAI_BASE_URL for a server without keys)")
        loop = self._ensure_loop()
        batch = self._batch(conversations, temperature, max_tokens, top_logprobs)
        results = asyncio.run_coroutine_threadsafe(batch, loop).result()
        failed, retries = sum(r.error is not None for r in results), sum(r.retries for r in results)
        if failed or retries:
            log.info("%s: %d requests, %d retries, %d failed", self.name, len(results), retries, failed)
        return results

    async def _batch(self, conversations: list[Conversation], temperature: float, max_tokens: int,
                     top_logprobs: int | None) -> list[ChatResult]:
        self._ensure_client()
        breaker, deadline = Breaker(self.breaker_threshold), time.monotonic() + self.retry_budget_s
        breaker.tasks = [asyncio.ensure_future(self._one(c, temperature, max_tokens, top_logprobs, breaker, deadline))
                         for c in conversations]
        done = await asyncio.gather(*breaker.tasks, return_exceptions=True)
        for r in done:
            if not isinstance(r, (ChatResult, asyncio.CancelledError)):
                raise r
        return [r if isinstance(r, ChatResult) else ChatResult(error=self._scrub(breaker.reason or "cancelled"),
                                                                service=True) for r in done]

    def _scrub(self, text: str) -> str:
        if self._api_key is not None:
            secret = self._api_key.get_secret_value()
            if secret:
                text = text.replace(secret, "**********")
        return text

    def _backoff(self, attempt: int, hint: float | None) -> float:
        if hint is not None:
            return min(hint, self.max_backoff_s) + random.uniform(0, 0.1 * self.backoff_s)
        base = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        return base / 2 + random.uniform(0, base / 2)

    async def _one(self, messages: Conversation, temperature: float, max_tokens: int, top_logprobs: int | None,
                   breaker: Breaker, deadline: float) -> ChatResult:
        import openai

        kwargs: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": temperature,
                                  "max_tokens": max_tokens}
        if top_logprobs:
            kwargs.update(logprobs=True, top_logprobs=top_logprobs)
        estimate = sum(len(m.get("content") or "") for m in messages) / 4 + max_tokens
        retries = 0

        def service(error: str) -> ChatResult:
            breaker.trip(self._scrub(error))
            return ChatResult(error=self._scrub(error), service=True, retries=retries)

        while True:
            await self._limiter.acquire(estimate)
            hint: float | None = None
            try:
                async with self._semaphore:
                    response = await self._client.chat.completions.create(**kwargs)
                breaker.success()
                return self._result(response, retries)
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
                return service(f"HTTP {e.status_code} from {self.endpoint}: {e.message}")
            except openai.RateLimitError as e:
                if "insufficient_quota" in str(e.code or "") + str(e.message):
                    return service(f"HTTP 429 from {self.endpoint}: {e.message}")
                error, hint = f"HTTP 429: {e.message}", retry_after_s(e.response.headers)
            except openai.InternalServerError as e:
                error, hint = f"HTTP {e.status_code}: {e.message}", retry_after_s(e.response.headers)
                breaker.failure(error)
            except openai.APIStatusError as e:
                if e.status_code not in (408, 409):  # 400, 413, 422: this conversation is refused as it is
                    breaker.success()
                    return ChatResult(error=self._scrub(f"HTTP {e.status_code}: {e.message}"), retries=retries,
                                      final=e.status_code in (400, 413, 422))
                error, hint = f"HTTP {e.status_code}: {e.message}", retry_after_s(e.response.headers)
                breaker.failure(error)
            except openai.APITimeoutError as e:
                error = f"{type(e).__name__}: {e}"
                breaker.failure(error)
            except openai.APIConnectionError as e:  # refused, unreachable, reset
                error = f"cannot reach {self.endpoint}: {e.__cause__ or e}"
                breaker.failure(error)
                if retries >= 2:
                    return service(error)
            except openai.OpenAIError as e:  # an answer that does not fit the schema, ...
                return ChatResult(error=self._scrub(f"{type(e).__name__}: {e}"), retries=retries)
            if breaker.reason is not None:
                return ChatResult(error=self._scrub(breaker.reason), service=True, retries=retries)
            delay = self._backoff(retries, hint)
            if retries >= self.max_retries or time.monotonic() + delay > deadline:
                if error.startswith("HTTP 429"):  # the server's pace, not this conversation
                    return service(f"{error} (rate limited after {retries} retries: lower "
                                   "SFT_SELECT_OPENAI_CONCURRENCY or SFT_SELECT_OPENAI_RPM)")
                return ChatResult(error=self._scrub(f"{error} (after {retries} retries)"), retries=retries)
            retries += 1
            log.debug("%s: %s; retry %d in %.2f s", self.name, self._scrub(error), retries, delay)
            await asyncio.sleep(delay)

    def _result(self, response: Any, retries: int) -> ChatResult:
        choice = response.choices[0] if response.choices else None
        usage = response.usage
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        cost = 0.0
        if self.price_per_mtok:
            cost = (prompt_tokens * self.price_per_mtok[0] + completion_tokens * self.price_per_mtok[1]) / 1e6
        top = None
        if choice is not None and choice.logprobs is not None and choice.logprobs.content:
            top = [_top_dict([(t.token, t.logprob) for t in pos.top_logprobs] or [(pos.token, pos.logprob)])
                   for pos in choice.logprobs.content]
        text = choice.message.content if choice is not None else None
        return ChatResult(text=text, error=None if text is not None else "empty completion",
                          prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, top_logprobs=top,
                          calls=1, retries=retries, cost_usd=cost)

    def __repr__(self) -> str:
        return f"OpenAIChat({self.name!r}, base_url={self.base_url!r})"


# -- local transformers --------------------------------------------------------------------------------


class LocalChat(LLM):
    """A local causal LM with its chat template: greedy generation at temperature 0 (sampling
    otherwise), left padding, conversations batched by length with the loss engine's
    :func:`~sft_select.tasks.backends.loss_engine.length_batches`: at most ``batch_size``
    conversations and ``token_budget`` padded positions (prompt + new tokens) a batch, so short
    prompts decode many at a time (each decoding step reads every weight once, whatever the
    batch) and long ones do not run out of memory.

    Top log-probs are the log-softmax of the model's raw logits at each generated position (before
    any sampling transform), so they are the model's own distribution."""

    def __init__(self, model: str = "smollm2-135m-instruct", *, batch_size: int = 32, token_budget: int = 16384,
                 precision: str = "float32"):
        super().__init__()
        self.model_name = model
        from sft_select.tasks.backends.models import model_identity

        # a folder by its content, never its path; a precision other than float32 is part of the name
        # (``local:<model>@int8``), so its ratings are a signal of their own
        self.name = f"local:{model_identity(model)}" + ("" if precision == "float32" else f"@{precision}")
        self.batch_size = batch_size
        self.token_budget = token_budget
        self.precision = precision
        self._lock = threading.Lock()

    def _chat(self, conversations: list[Conversation], *, temperature: float, max_tokens: int,
              top_logprobs: int | None, label_tokens: tuple[str, ...] = ()) -> list[ChatResult]:
        from sft_select.tasks.backends.loss_engine import length_batches
        from sft_select.tasks.backends.models import load_scoring_lm

        model, tokenizer = load_scoring_lm(self.model_name, self.precision)
        ids = [self.encode(tokenizer, c) for c in conversations]
        limit = getattr(model.config, "max_position_embeddings", None)
        results: list[ChatResult | None] = [None] * len(conversations)
        order = []
        for i, seq in enumerate(ids):
            if limit and len(seq) + max_tokens > limit:
                results[i] = ChatResult(error=f"prompt of {len(seq)} tokens + {max_tokens} new exceeds the "
                                              f"model's {limit} positions", prompt_tokens=len(seq))
            else:
                order.append(i)
        batches = [[order[b] for b in batch] for batch in
                   length_batches([len(ids[i]) + max_tokens for i in order], self.token_budget)]
        with self._lock:
            for batch in batches:
                for start in range(0, len(batch), self.batch_size):
                    chunk = batch[start:start + self.batch_size]
                    try:
                        out = self._generate(model, tokenizer, [ids[i] for i in chunk], temperature, max_tokens,
                                             top_logprobs, label_tokens, bf16=self.precision == "bfloat16")
                    except (RuntimeError, ValueError) as e:  # e.g. out of memory: this chunk fails, not the batch
                        out = [ChatResult(error=f"{type(e).__name__}: {e}")] * len(chunk)
                    for i, r in zip(chunk, out):
                        results[i] = r
        return [r for r in results if r is not None]

    @staticmethod
    def encode(tokenizer, conversation: Conversation) -> list[int]:
        """The token ids of a conversation: the model's chat template with the assistant's turn
        opened. A model without a chat template (a base model, or a scorer fine-tuned on raw text
        such as DEITA's) takes one user message as its raw prompt, with the tokenizer's own start
        token, as ``tokenizer(text)`` gives it."""
        if getattr(tokenizer, "chat_template", None):
            prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
            return tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(conversation) != 1 or conversation[0]["role"] != "user":
            raise ValueError("the model has no chat template: only a single user message can be sent, as a raw "
                             f"prompt (got the roles {[m['role'] for m in conversation]})")
        return tokenizer(conversation[0]["content"])["input_ids"]

    @staticmethod
    def label_ids(tokenizer, labels: Sequence[str]) -> dict[str, int]:
        """The vocabulary id of each label that is one token (the token itself, as DEITA's scorer
        reads "1".."6", else the one token the text encodes to); labels of several tokens are left out."""
        found = {}
        for label in labels:
            tid = tokenizer.convert_tokens_to_ids(label)
            if tid is None or tid == tokenizer.unk_token_id:
                encoded = tokenizer(label, add_special_tokens=False)["input_ids"]
                tid = encoded[0] if len(encoded) == 1 else None
            if tid is not None:
                found[label] = int(tid)
        return found

    @staticmethod
    def _generate(model, tokenizer, ids: list[list[int]], temperature: float, max_tokens: int,
                  top_logprobs: int | None, label_tokens: tuple[str, ...] = (), bf16: bool = False) -> list[ChatResult]:
        import torch

        enc = tokenizer.pad({"input_ids": ids}, padding=True, padding_side="left", return_tensors="pt")
        enc = {k: v.to(model.device) for k, v in enc.items()}
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with torch.inference_mode(), torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model.generate(**enc, max_new_tokens=max_tokens, pad_token_id=tokenizer.pad_token_id,
                                 return_dict_in_generate=True, output_logits=bool(top_logprobs), **sampling)
        width = enc["input_ids"].shape[1]
        new = out.sequences[:, width:]
        eos = model.generation_config.eos_token_id
        stops = {tokenizer.eos_token_id, *([eos] if isinstance(eos, int) else eos or [])} - {None}
        results = []
        for row in range(new.shape[0]):
            tokens = new[row].tolist()
            length = next((j for j, t in enumerate(tokens) if t in stops), len(tokens))
            top = None
            if top_logprobs:
                top = []
                labels = LocalChat.label_ids(tokenizer, label_tokens)
                for pos in range(length):
                    logprobs = torch.log_softmax(out.logits[pos][row].float(), dim=-1)
                    values, indices = logprobs.topk(top_logprobs)
                    pairs = [(tokenizer.decode([t]), v) for t, v in zip(indices.tolist(), values.tolist())]
                    top.append(_top_dict(pairs + [(label, float(logprobs[t])) for label, t in labels.items()]))
            results.append(ChatResult(text=tokenizer.decode(tokens[:length], skip_special_tokens=True),
                                      prompt_tokens=int(enc["attention_mask"][row].sum()),
                                      completion_tokens=length, top_logprobs=top, calls=1))
        return results


# -- choosing a backend ---------------------------------------------------------------------------------


def get_llm(spec: str | None = None) -> LLM:
    """The backend named by ``spec`` (default: ``settings().llm_backend``), one per process:

    - ``"local"`` / ``"local:<embedded name or model folder>"``: :class:`LocalChat`
      (``"local"`` means ``settings().local_llm``); ``@int8`` or ``@bfloat16`` after it picks the
      precision (float32 otherwise);
    - ``"openai"`` / ``"openai:<model>"``: :class:`OpenAIChat` on ``OPENAI_BASE_URL`` with the
      concurrency, rate limits and timeout of the settings (``"openai"`` means ``settings().openai_model``).

    An ``LLM.name`` is a valid spec, so a signal's ``model`` parameter rebuilds its backend; an
    OpenAI name carries its server (``openai:<model>@<endpoint>``), which must be the configured one.
    """
    s = settings()
    spec = spec or s.llm_backend
    kind, _, model = spec.partition(":")
    if kind.partition("@")[0] == "local":
        target = model + kind.removeprefix("local")  # "local@int8" is "local:@int8"
        model, _, precision = target.rpartition("@") if "@" in target else (target, "", "float32")
        return _local(model or s.local_llm, precision)
    if kind == "openai":
        model, at, endpoint = model.rpartition("@") if "@" in model else (model, "", "")
        configured = s.openai_endpoint or endpoint_of(s.openai_base_url)
        if at and endpoint != configured:
            raise ValueError(f"{spec} was made on the server {endpoint!r}, but OPENAI_BASE_URL points at "
                             f"{configured!r} (set SFT_SELECT_OPENAI_ENDPOINT={endpoint} if it serves the same model)")
        return _openai(model or s.openai_model, s.openai_base_url, api_key(), s.openai_max_concurrency,
                       s.openai_rpm, s.openai_tpm, s.openai_timeout_s, s.openai_price_per_mtok, configured)
    raise ValueError(f"unknown LLM backend {spec!r}: use 'local', 'local:<model>' (either with '@int8' or "
                     "'@bfloat16' after it) or 'openai:<model>'")


def api_key() -> SecretStr | None:
    """The OpenAI-compatible server's key: from the Prefect Secret block named by
    ``SFT_SELECT_OPENAI_KEY_BLOCK`` when one is named, else ``OPENAI_API_KEY``."""
    s = settings()
    if s.openai_key_block:
        from prefect.blocks.system import Secret

        try:
            return SecretStr(str(Secret.load(s.openai_key_block).get()))
        except ValueError as e:  # no such block
            raise ValueError(f"SFT_SELECT_OPENAI_KEY_BLOCK names the Secret block {s.openai_key_block!r}, which the "
                             f"Prefect server does not have ({e})") from None
    return s.openai_api_key


@lru_cache(maxsize=4)
def _local(model: str, precision: str = "float32") -> LocalChat:
    return LocalChat(model, precision=precision)


@lru_cache(maxsize=8)
def _openai(model: str, base_url: str | None, api_key: SecretStr | None, max_concurrency: int, rpm: float | None,
            tpm: float | None, timeout_s: float, price_per_mtok: tuple[float, float] | None,
            endpoint: str) -> OpenAIChat:
    return OpenAIChat(model, base_url=base_url, api_key=api_key, max_concurrency=max_concurrency, rpm=rpm, tpm=tpm,
                      timeout_s=timeout_s, price_per_mtok=price_per_mtok, endpoint=endpoint)


__all__ = ["Breaker", "ChatResult", "LLM", "LocalChat", "OpenAIChat", "RateLimiter", "api_key", "endpoint_of", "get_llm", "retry_after_s", "usage_of"]
