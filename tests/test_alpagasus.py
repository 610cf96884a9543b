"""AlpaGasus against a real local OpenAI-compatible server: the judge is paid once per example; a
second budget, and a second dataset holding the same examples, ask the server nothing."""

from __future__ import annotations

import json
import math
import re

import pytest
from openai_server import OpenAIServer, last_user

from sft_select.flows.alpagasus import PAPER_KEPT_SHARE, AlpaGasusParams, alpagasus
from sft_select.settings import settings
from sft_select.storage import make_example
from sft_select.storage.examples import frame
from sft_select.tasks.judge import llm_signal
from sft_select.tasks.prompts import ALPAGASUS

pytestmark = pytest.mark.usefixtures("prefect_api")


def judge(request) -> str:
    """Rates by a rule: the response "answer i" gets (i % 6) * 0.5 + 2.5, i.e. 2.5 .. 5.0."""
    i = int(re.search(r"### Response:\nanswer (\d+)", last_user(request)).group(1))
    return f"{(i % 6) * 0.5 + 2.5}\nThe response is judged by a rule."


@pytest.fixture
def server(monkeypatch):
    with OpenAIServer(judge) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-alpagasus")
        settings.cache_clear()
        yield server
    settings.cache_clear()


def test_alpagasus_rates_once_and_reuses_the_ratings(store, server):
    rows = [make_example([{"role": "user", "content": f"Task {i}"}, {"role": "assistant", "content": f"answer {i}"}],
                         instruction=f"Task {i}", input="" if i % 2 else f"input {i}") for i in range(12)]
    store.datasets.register("pool", frame(rows))
    judge_name = "openai:judge-alpagasus"

    kept = alpagasus(AlpaGasusParams(dataset="pool", judge=judge_name))
    assert server.requests == 12
    chosen = store.selections.read(kept.selection_id)
    # ratings >= 4.5: i % 6 in (4, 5) -> 4 of 12
    assert chosen["score"].to_list() == [5.0, 5.0, 4.5, 4.5]
    assert chosen["reason"][0] == "accuracy rating 5.0 >= 4.5, rank 1"
    request = server.bodies[0]
    assert request["temperature"] == 0 and request["max_tokens"] == 256 and request["model"] == "judge-alpagasus"
    assert "### Input:\n" in request["messages"][1]["content"]

    top3 = alpagasus(AlpaGasusParams(dataset="pool", judge=judge_name, budget=3, threshold=None))
    assert server.requests == 12  # same signal, same dataset: nothing asked
    assert store.selections.read(top3.selection_id)["score"].to_list() == [5.0, 5.0, 4.5]

    store.datasets.register("half", frame(rows[:6]))  # another dataset, other fingerprint, same examples
    half = alpagasus(AlpaGasusParams(dataset="half", judge=judge_name, threshold=4.0))
    assert server.requests == 12  # ratings are keyed by example, not by dataset
    assert store.selections.read(half.selection_id)["score"].to_list() == [5.0, 4.5, 4.0]

    signal = llm_signal(ALPAGASUS["accuracy", "text"], judge_name)
    cost = store.catalog.query("SELECT calls, model FROM signals WHERE signal_id = ?", [signal.id]).row(0)
    assert cost == (12, f"{judge_name}@{server.url.removeprefix('http://')}")  # the judge is model and server
    params = store.catalog.query("SELECT params FROM selections WHERE selection_id = ?", [kept.selection_id]).item()
    assert judge_name in params


def test_helpfulness_is_its_own_signal(store, server):
    rows = [make_example([{"role": "user", "content": "Task 0"}, {"role": "assistant", "content": "answer 5"}])]
    store.datasets.register("one", frame(rows))
    acc = alpagasus(AlpaGasusParams(dataset="one", judge="openai:judge-help"))
    helpful = alpagasus(AlpaGasusParams(dataset="one", judge="openai:judge-help", criterion="helpfulness"))
    assert server.requests == 2 and "helpfulness" in server.bodies[1]["messages"][1]["content"]
    assert acc.selection_id != helpful.selection_id and helpful.rows == 1


def test_the_progress_artifact_shows_counts_and_rate(store, server):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType
    from prefect.client.schemas.sorting import ArtifactSort

    rows = [make_example([{"role": "user", "content": f"Job {i}"}, {"role": "assistant", "content": f"answer {i}"}])
            for i in range(5)]
    store.datasets.register("progress", frame(rows))
    alpagasus(AlpaGasusParams(dataset="progress", judge="openai:judge-progress", batch_size=2))

    async def progress_artifacts():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])),
                                               sort=ArtifactSort.CREATED_DESC, limit=50)  # the newest

    [bar] = [a for a in asyncio.run(progress_artifacts()) if "on progress@1" in (a.description or "")]
    assert bar.data == 100.0 and re.search(r": 5/5 examples, [\d.]+ examples/s$", bar.description)


def expected_judge(request) -> dict:
    """A judge whose digit distribution centres on 2 + (i % 40) / 20, i.e. expected scores 2.0 .. 3.95:
    every one below the paper's 4.5 on the text scale, as a small judge's are."""
    i = int(re.search(r"### Response:\nanswer (\d+)", last_user(request)).group(1))
    centre = 2 + (i % 40) / 20
    weights = {str(k): math.exp(-((k - centre) ** 2)) for k in range(6)}
    total = sum(weights.values())
    return {"text": "3", "top_logprobs": [{k: math.log(w / total) for k, w in weights.items()}]}


def test_expected_scoring_calibrates_the_paper_threshold_to_the_share_it_kept(store, monkeypatch):
    rows = [make_example([{"role": "user", "content": f"Task {i}"}, {"role": "assistant", "content": f"answer {i}"}])
            for i in range(40)]
    store.datasets.register("pool40", frame(rows))
    with OpenAIServer(expected_judge) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-alpagasus")
        settings.cache_clear()
        params = AlpaGasusParams(dataset="pool40", judge="openai:judge-expected", scoring="expected")
        kept = alpagasus(params)
        strict = alpagasus(params.model_copy(update={"threshold": 4.5}))
        text_scale = alpagasus(params.model_copy(update={"threshold": None, "budget": 3}))
    settings.cache_clear()
    assert server.requests == 40 and server.bodies[0]["logprobs"] is True  # one rating per example, then reused

    chosen = store.selections.read(kept.selection_id)
    assert chosen.height == math.ceil(PAPER_KEPT_SHARE * 40) == 8  # the paper's share, not 0 of 40
    scores = store.signals.values(llm_signal(ALPAGASUS["accuracy", "expected"], "openai:judge-expected"),
                                  [r["uid"] for r in rows], alias="score")["score"]
    assert scores.max() < 4.5 and chosen["score"].min() == pytest.approx(sorted(scores, reverse=True)[7])
    recorded = json.loads(store.catalog.query("SELECT params FROM selections WHERE selection_id = ?",
                                              [kept.selection_id]).item())["threshold"]
    assert recorded == pytest.approx(chosen["score"].min())  # the value applied, not "paper"
    assert store.selections.read(strict.selection_id).height == 0  # 4.5 given as a number means 4.5
    assert store.selections.read(text_scale.selection_id).height == 3  # a budget ranks
