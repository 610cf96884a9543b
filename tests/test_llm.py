"""The LLM backends and LLM signals against a real local OpenAI-compatible HTTP server (and the real
SmolLM2 for the local backend): retries, limits, error rows with raw text, re-parsing without
model calls, and an API key that shows up nowhere but in the request header."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from contextlib import contextmanager

import polars as pl
import pytest
from openai_server import BadRequest, OpenAIServer, last_user

from sft_select.settings import settings
from sft_select.storage import FillAborted, Signal, make_example
from sft_select.storage.examples import frame
from sft_select.tasks.backends.chat import LocalChat, OpenAIChat, RateLimiter, get_llm, retry_after_s
from sft_select.tasks.signal_task import DatasetRef, fill_signal
from sft_select.tasks.judge import (Prompt, expected_score, first_number, llm_batch_of, llm_signal, parse_expected_score,
                                  prompt_of, reparse)


def convs(*texts: str) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": t}] for t in texts]


def rating_prompt(name: str, parser_version: str = "1", parse=None) -> Prompt:
    return Prompt(name=name, version="1", system="Rate the answer.",
                  template="Q: {instruction}\nInput: {input_or_none}\nA: {output}\nScore 0-5 on the first line.",
                  parse=parse or (lambda raw: first_number(raw, low=0, high=5)), parser_version=parser_version,
                  max_tokens=32)


@pytest.fixture
def openai_env(monkeypatch):
    """Point the settings at a server: call with its url (and a key); restores the settings after."""

    def point(url: str, key: str = "sk-test-not-secret") -> None:
        monkeypatch.setenv("OPENAI_BASE_URL", url)
        monkeypatch.setenv("OPENAI_API_KEY", key)
        settings.cache_clear()

    yield point
    settings.cache_clear()


@contextmanager
def judged(store, openai_env, prompt: Prompt, answer, n: int = 6, **server_options):
    """A server answering by ``answer``; ``prompt``'s signal filled once for ``n`` examples (one
    attempt each). Yields the server, the dataset, the signal and the fill's report."""
    with OpenAIServer(answer, **server_options) as server:
        openai_env(server.url)
        data = pool(store, n)
        signal = llm_signal(prompt, f"openai:judge-{prompt.name}")
        yield server, data, signal, fill_signal(signal, data, llm_batch_of, max_attempts=1)


def pool(store, n: int, name: str = "pool") -> DatasetRef:
    rows = [make_example([{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": ("good" if i % 2 == 0 else "vague") + f" answer {i}"}],
                         source="test") for i in range(n)]
    return DatasetRef.of(store.datasets.register(name, frame(rows)))


# -- the OpenAI-compatible backend ---------------------------------------------------------------------


def test_retries_through_429_and_500_honouring_retry_after():
    with OpenAIServer(lambda r: f"echo {last_user(r)}", fail_429=3, retry_after="0.3", fail_500=2) as server:
        llm = OpenAIChat("judge", base_url=server.url, api_key="sk-x", backoff_s=0.01)
        began = time.perf_counter()
        [first] = llm.chat(convs("a"))
        elapsed = time.perf_counter() - began
        rest = llm.chat(convs("b", "c"))
        llm.close()
    assert elapsed >= 3 * 0.3  # three 429s, each saying "Retry-After: 0.3", before two 500s
    assert [r.text for r in [first, *rest]] == ["echo a", "echo b", "echo c"]
    assert first.retries == 5 and all(r.error is None and r.retries == 0 for r in rest)
    assert server.requests == 3 + 5 and server.completions == 3
    assert llm.usage["calls"] == 3 and llm.usage["retries"] == 5
    assert llm.usage["prompt_tokens"] == 3 and llm.usage["completion_tokens"] == 6


def test_a_failing_example_is_an_error_result_not_an_exception():
    def answer(request):
        if last_user(request) == "bad":
            raise RuntimeError("cannot answer this one")
        return "fine"

    with OpenAIServer(answer) as server:
        llm = OpenAIChat("judge", base_url=server.url, api_key="sk-x", backoff_s=0.01, max_retries=2)
        results = llm.chat(convs("ok", "bad", "ok too"))
        llm.close()
    assert [r.text for r in results] == ["fine", None, "fine"]
    assert "HTTP 500" in results[1].error and "after 2 retries" in results[1].error
    assert server.requests == 2 + 3  # the bad one was tried 1 + 2 times
    assert results[1].retries == 2 and results[1].calls == 0


def test_client_errors_are_not_retried():
    with OpenAIServer(api_key="sk-right") as server:
        llm = OpenAIChat("judge", base_url=server.url, api_key="sk-wrong", backoff_s=0.01)
        [result] = llm.chat(convs("x"))
        llm.close()
    assert result.error.startswith("HTTP 401") and server.requests == 1


def test_concurrency_is_bounded():
    with OpenAIServer(latency_s=0.05) as server:
        llm = OpenAIChat("judge", base_url=server.url, api_key="sk-x", max_concurrency=3)
        llm.chat(convs(*[str(i) for i in range(12)]))
        llm.close()
    assert server.max_in_flight == 3


def test_requests_per_minute_limit():
    with OpenAIServer() as server:
        llm = OpenAIChat("judge", base_url=server.url, api_key="sk-x", rpm=600)  # 10/s, bursts of 10
        began = time.perf_counter()
        assert all(r.error is None for r in llm.chat(convs(*[str(i) for i in range(25)])))
        elapsed = time.perf_counter() - began
        llm.close()
    assert 1.4 <= elapsed < 5  # 15 requests beyond the first second's 10, at 10 per second


def test_tokens_per_minute_limit():
    limiter = RateLimiter(tpm=6000)  # 100 tokens/s, bursts of 100

    async def four_requests() -> None:
        for _ in range(4):
            await limiter.acquire(50)

    began = time.perf_counter()
    asyncio.run(four_requests())
    assert 0.9 <= time.perf_counter() - began < 2  # 200 tokens: the first 100 at once, then 100 per second


def test_retry_after_header_forms():
    assert retry_after_s({"retry-after": "2"}) == 2.0
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= retry_after_s({"retry-after": date}) <= 31
    assert retry_after_s({}) is None and retry_after_s({"retry-after": "soon"}) is None


def test_cost_accounting_from_price():
    with OpenAIServer(lambda r: "one two three four") as server:
        llm = OpenAIChat("judge", base_url=server.url, api_key="sk-x", price_per_mtok=(1.0, 10.0))
        [result] = llm.chat(convs("a b"))
        llm.close()
    assert (result.prompt_tokens, result.completion_tokens) == (2, 4)
    assert math.isclose(result.cost_usd, (2 * 1.0 + 4 * 10.0) / 1e6)


def test_get_llm_specs(openai_env):
    openai_env("http://127.0.0.1:9/v1")
    assert get_llm("openai:some-model").name == "openai:some-model@127.0.0.1:9/v1"
    assert get_llm("openai:some-model") is get_llm("openai:some-model@127.0.0.1:9/v1")
    assert get_llm("openai").name == f"openai:{settings().openai_model}@127.0.0.1:9/v1"
    assert get_llm("local").name == "local:smollm2-135m-instruct"
    # a precision other than float32 is part of the local judge's name, so its ratings are a signal of their own
    int8 = get_llm("local@int8")
    assert int8.name == "local:smollm2-135m-instruct@int8" and int8.precision == "int8"
    assert get_llm(int8.name) is int8 and get_llm("local:smollm2-135m-instruct") is get_llm("local")
    with pytest.raises(ValueError, match="unknown LLM backend"):
        get_llm("vllm:x")


# -- LLM signals -----------------------------------------------------------------------------------------


def test_parsers():
    assert first_number("4.5\nAccurate and complete.", low=0, high=5) == 4.5
    assert first_number("Score: 3 - mostly right", low=0, high=5) == 3
    assert first_number("**5**\n", low=0, high=5) == 5
    with pytest.raises(ValueError, match="outside"):
        first_number("7\n", low=0, high=5)
    with pytest.raises(ValueError, match="no score"):
        first_number("A fine answer. 5", low=0, high=5)
    assert math.isclose(expected_score({"1": math.log(0.25), " 2": math.log(0.25), "2": math.log(0.5), "x": 0.0}),
                        1.75)
    # renormalised over the score tokens only
    assert math.isclose(expected_score({"6": math.log(0.1), "4": math.log(0.1), "The": math.log(0.8)}), 5.0)
    with pytest.raises(ValueError):
        expected_score({"The": -0.1})


def test_prompt_identity():
    prompt = rating_prompt("test_identity")
    signal = llm_signal(prompt, "openai:judge")
    assert signal.params["prompt_sha"] == prompt.sha and signal.version == prompt.parser_version
    assert prompt_of(signal) is prompt
    with pytest.raises(ValueError, match="bump its version"):  # same name and version, other wording
        Prompt(name="test_identity", version="1", template="Other words {output}", parse=float)
    assert llm_signal(rating_prompt("test_identity", parser_version="2"), "openai:judge").id != signal.id
    with pytest.raises(KeyError, match="no prompt"):
        prompt_of(Signal("test_unknown", {"prompt": "nope", "prompt_version": "1"}))


def test_score_with_llm_keeps_raw_text_and_records_parse_failures(store, openai_env):
    answer = lambda r: "4\nclear" if "good" in last_user(r) else "I like it"  # noqa: E731
    with judged(store, openai_env, rating_prompt("test_rating_a"), answer) as (server, data, signal, ref):
        assert server.requests == 6
        assert (ref.computed, ref.errors, ref.usage["calls"]) == (6, 3, 6)
        rows = store.signals.read(signal).sort("uid")
        ok, bad = rows.filter(pl.col("error").is_null()), rows.filter(pl.col("error").is_not_null())
        assert ok["value"].to_list() == [4.0] * 3 and ok["raw"].to_list() == ["4\nclear"] * 3
        assert bad["value"].null_count() == 3 and bad["raw"].to_list() == ["I like it"] * 3
        assert all(e.startswith("parse: no score") for e in bad["error"])
        # the judge saw the example's fields through the template
        assert server.bodies[0]["messages"][0] == {"role": "system", "content": "Rate the answer."}
        assert "Input: (none)" in server.bodies[0]["messages"][1]["content"]
        # a second fill asks nothing: values are there, errors have used their one attempt
        assert fill_signal(signal, data, llm_batch_of, max_attempts=1).computed == 0
        assert server.requests == 6
        # the catalog holds the signal's cost
        row = store.catalog.query("SELECT calls, prompt_tokens, completion_tokens FROM signals WHERE signal_id = ?",
                                  [signal.id]).row(0)
        assert row[0] == 6 and row[1] > 0 and row[2] > 0


def test_reparse_makes_no_request(store, openai_env):
    strict = rating_prompt("test_rating_b")
    answer = lambda r: "4\nclear" if "good" in last_user(r) else "Rating: four"  # noqa: E731
    with judged(store, openai_env, strict, answer) as (server, data, signal, _):
        assert server.requests == 6

        words = {"four": 4.0}

        def lenient(raw: str) -> float:
            head = raw.split("\n")[0].removeprefix("Rating:").strip()
            return words[head] if head in words else first_number(head, low=0, high=5)

        lenient_prompt = rating_prompt("test_rating_b", parser_version="2", parse=lenient)
        with pytest.raises(ValueError, match="bump"):
            reparse(signal, strict)
        new = reparse(signal, lenient_prompt)
        assert server.requests == 6
        assert new.version == "2" and new.id != signal.id and new == llm_signal(lenient_prompt, signal.model)
        values = store.signals.read(new)
        assert values.height == 6 and values["error"].null_count() == 6
        assert values["value"].to_list() == [4.0] * 6
        # filling the re-parsed signal finds everything: still no request
        assert fill_signal(new, data, llm_batch_of).computed == 0
        assert server.requests == 6


def test_expected_score_from_openai_logprobs(store, openai_env):
    prompt = Prompt(name="test_expected", version="1", template="Rate {output} from 1 to 6.",
                    parse=parse_expected_score, max_tokens=1, top_logprobs=5)
    top = {"5": math.log(0.6), "4": math.log(0.3), "Sure": math.log(0.1)}
    answer = lambda r: {"text": "5", "top_logprobs": [top]}  # noqa: E731
    with judged(store, openai_env, prompt, answer, n=2) as (server, _, signal, _):
        assert server.bodies[0]["logprobs"] is True and server.bodies[0]["top_logprobs"] == 5
    values = store.signals.read(signal)
    assert values["error"].null_count() == 2
    assert all(math.isclose(v, (5 * 0.6 + 4 * 0.3) / 0.9) for v in values["value"])
    assert json.loads(values["raw"][0])["text"] == "5"


def test_refused_requests_are_final_error_rows(store, openai_env):
    """An HTTP 400 (a context overflow, say) is about the example: stored as its final error."""
    prompt = rating_prompt("test_rating_d")

    def answer(request):
        if "Question 1?" in last_user(request):
            raise BadRequest("maximum context length exceeded")
        return "5"

    with judged(store, openai_env, prompt, answer, n=3) as (server, _, signal, ref):
        assert server.requests == 3 and server.completions == 2
    rows = store.signals.read(signal).filter(pl.col("error").is_not_null())
    assert ref.errors == 1 and rows["final"].to_list() == [True]
    assert rows["error"][0].startswith("llm: HTTP 400") and "context length" in rows["error"][0]


def test_api_key_never_leaks(store, openai_env, prefect_api, caplog, home):
    """The key reaches the server's Authorization header and nowhere else: not the catalog, the
    signal parquet, logs, Prefect artifacts, task results or error texts (the server's 401 repeats
    the key it was sent, as OpenAI's does in part)."""
    from prefect import flow
    from prefect.client.orchestration import get_client

    from sft_select.tasks.judge import score_with_llm

    secret = f"sk-test-{uuid.uuid4().hex}"
    prompt = rating_prompt("test_rating_secret")
    caplog.set_level(logging.DEBUG)

    @flow(name="judge-with-secret")
    def judge(signal, data):
        return score_with_llm(signal, data)

    with OpenAIServer(lambda r: "5\nok", api_key=secret, fail_429=1) as server:
        openai_env(server.url, key=secret)
        data = pool(store, 4)
        signal = llm_signal(prompt, "openai:judge-secret")
        ref = judge(signal, data)
    assert ref.computed == 4 and server.authorizations[-1] == f"Bearer {secret}"
    with OpenAIServer(api_key="sk-some-other-key") as server:  # its 401 echoes our key back
        openai_env(server.url, key=secret)
        other = llm_signal(rating_prompt("test_rating_secret_2"), "openai:judge-secret")
        with pytest.raises(FillAborted, match="HTTP 401") as refused:
            fill_signal(other, data, llm_batch_of, max_attempts=1)
    assert store.signals.read(other).height == 0  # the key's fault, not the examples'

    texts = [caplog.text, str(refused.value), repr(get_llm("openai:judge-secret")),
             str(get_llm("openai:judge-secret").__dict__)]
    for table in ("datasets", "signals", "signal_parts", "selections", "evaluations", "derived"):
        texts.append(store.catalog.query(f"SELECT * FROM {table}").write_csv())
    for part in (store.home / "signals").rglob("*.parquet"):
        texts.append(pl.read_parquet(part).write_csv())
    for path in home.rglob("*"):  # Prefect's home: persisted task results and settings
        if path.is_file() and path.stat().st_size < 5_000_000:
            texts.append(path.read_bytes().decode("utf-8", "replace"))

    async def prefect_records() -> list[str]:
        """Every artifact and log line on the server (page by page: earlier tests made many)."""
        records: list[str] = []
        async with get_client() as client:
            for read, render in ((client.read_artifacts, lambda a: a.model_dump_json()),
                                 (client.read_logs, lambda entry: entry.message)):
                offset = 0
                while page := await read(limit=200, offset=offset):
                    records += [render(r) for r in page]
                    offset += len(page)
        return records

    records = asyncio.run(prefect_records())
    assert any(signal.id in r for r in records)  # the run did publish artifacts and logs
    texts += records
    assert not [t for t in texts if secret in t]


# -- the local transformers backend ----------------------------------------------------------------------


@pytest.mark.slow
def test_local_backend_generates_and_scores(store):
    llm = LocalChat("smollm2-135m-instruct", batch_size=4)
    questions = convs("What is the capital of France?", "Name a colour.",
                      "Write the number five as a digit, and nothing else.")
    batched = llm.chat(questions, max_tokens=12, top_logprobs=3)
    alone = [llm.chat([q], max_tokens=12)[0] for q in questions]
    for b, a in zip(batched, alone):
        assert b.error is None and b.text and b.completion_tokens > 0 and b.prompt_tokens > 10
        assert b.text == a.text  # greedy: left padding in a batch changes nothing
        assert len(b.top_logprobs) == b.completion_tokens
        assert all(len(pos) >= 1 and all(lp <= 0 for lp in pos.values()) for pos in b.top_logprobs)
        first = max(b.top_logprobs[0], key=b.top_logprobs[0].get)
        assert b.text.startswith(first.strip()) or first.strip() == ""

    prompt = rating_prompt("test_rating_local")
    data = pool(store, 4)
    signal = llm_signal(prompt, "local")
    assert signal.model == "local:smollm2-135m-instruct"
    ref = fill_signal(signal, data, llm_batch_of, max_attempts=1)
    rows = store.signals.read(signal)
    assert ref.computed == 4 and rows.height == 4 and rows["raw"].null_count() == 0
    for row in rows.iter_rows(named=True):
        assert (row["error"] is None and 0 <= row["value"] <= 5) or row["error"].startswith("parse:")


def test_the_key_comes_from_a_prefect_secret_block_when_one_is_named(store, openai_env, prefect_api, monkeypatch):
    from prefect.blocks.system import Secret

    secret = f"sk-block-{uuid.uuid4().hex}"
    Secret(value=secret).save("judge-key-test", overwrite=True)
    with OpenAIServer(lambda r: "4", api_key=secret) as server:
        openai_env(server.url, key="sk-the-environment-has-another-one")
        monkeypatch.setenv("SFT_SELECT_OPENAI_KEY_BLOCK", "judge-key-test")
        settings.cache_clear()
        data = pool(store, 3)
        ref = fill_signal(llm_signal(rating_prompt("test_rating_block"), "openai:judge-block"), data, llm_batch_of)
        assert ref.computed == 3 and server.completions == 3 and server.authorizations[-1] == f"Bearer {secret}"
        assert secret not in repr(get_llm("openai:judge-block")) and secret not in str(ref)
        monkeypatch.setenv("SFT_SELECT_OPENAI_KEY_BLOCK", "no-such-block")
        settings.cache_clear()
        with pytest.raises(ValueError, match="no-such-block"):
            get_llm("openai:judge-block")
