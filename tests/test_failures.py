"""Fault drills: failures must never pass as success. A dead or misconfigured judge stops the run
at once and charges no example; failed rows can be asked again; two runs of one signal pay once;
a selection short of its budget because examples failed says so and fails."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from openai_server import BadRequest, OpenAIServer, last_user
from typer.testing import CliRunner

from sft_select.flows.alpagasus import AlpaGasusParams, alpagasus
from sft_select.flows.cli import app
from sft_select.flows.common import IncompleteSelection
from sft_select.settings import settings
from sft_select.storage import BatchResult, FillAborted, Outcome, Signal, make_example
from sft_select.storage.examples import frame
from sft_select.tasks.backends.chat import OpenAIChat
from sft_select.tasks.judge import llm_signal
from sft_select.tasks.prompts import ALPAGASUS

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("prefect_api")


def rated(request) -> str:
    i = int(last_user(request).split("### Response:\nanswer ")[1].split()[0])
    return f"{4 + i % 2}\nrated by rule"


def register(store, n: int, name: str = "pool"):
    rows = [make_example([{"role": "user", "content": f"Task {i}"}, {"role": "assistant", "content": f"answer {i}"}])
            for i in range(n)]
    return store.datasets.register(name, frame(rows))


def point(monkeypatch, url: str, key: str = "sk-test-failures") -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    monkeypatch.setenv("OPENAI_API_KEY", key)
    settings.cache_clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fault", ["wrong key", "500 for everything", "unreachable"])
def test_a_dead_judge_stops_the_run_at_once_and_charges_no_example(store, monkeypatch, fault):
    register(store, 40)
    params = AlpaGasusParams(dataset="pool", judge="openai:judge-drill", budget=10)
    signal_prompt = ALPAGASUS["accuracy", "text"]
    with OpenAIServer(rated, api_key="sk-right", fail_500=-1 if fault == "500 for everything" else 0) as server:
        url = server.url if fault != "unreachable" else f"http://127.0.0.1:{free_port()}/v1"
        point(monkeypatch, url, "sk-wrong" if fault == "wrong key" else "sk-right")
        began = time.monotonic()
        with pytest.raises(FillAborted) as stopped:
            alpagasus(params)
        assert time.monotonic() - began < 15, "a dead judge must stop the run within seconds"
        assert "judge-drill" in str(stopped.value) and "sk-right" not in str(stopped.value)
        signal = llm_signal(signal_prompt, "openai:judge-drill")
        assert store.signals.read(signal).height == 0  # no example charged an attempt
        assert server.requests <= 32  # the first wave at most, not every retry of every example

        # the fault is mended: the next run computes every example
        server.fail_500 = 0
        point(monkeypatch, server.url, "sk-right")
        before = server.requests
        ref = alpagasus(params)
        assert server.requests - before == 40 and ref.rows == 10
        assert store.signals.read(llm_signal(signal_prompt, "openai:judge-drill")).filter(
            pl.col("error").is_not_null()).height == 0


def test_cli_exits_non_zero_with_one_line_on_a_wrong_key(tmp_path, monkeypatch):
    with OpenAIServer(rated, api_key="sk-right") as server:
        env = {**os.environ, "SFT_SELECT_HOME": str(tmp_path / "home"), "OPENAI_BASE_URL": server.url,
               "OPENAI_API_KEY": "sk-wrong-key-123"}
        cli = [sys.executable, "-c", "from sft_select.flows.cli import app; app()"]
        pool = tmp_path / "pool.jsonl"
        pool.write_text("".join(f'{{"instruction": "Task {i}", "output": "answer {i}"}}\n' for i in range(20)))
        subprocess.run([*cli, "ingest", str(pool), "--name", "pool"], env=env, check=True, capture_output=True)
        began = time.monotonic()
        done = subprocess.run([*cli, "run", "alpagasus", "--dataset", "pool", "--judge", "openai:judge-cli"],
                              env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and time.monotonic() - began < 60
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "HTTP 401" in errors[0] and "Traceback" not in done.stderr
    assert "sk-wrong-key-123" not in done.stderr + done.stdout


def test_one_failing_example_holds_its_batch_for_a_bounded_time():
    def answer(request):
        if "poison" in last_user(request):
            raise RuntimeError("this one always fails")
        return "5"

    with OpenAIServer(answer) as server:
        llm = OpenAIChat("judge", base_url=server.url, api_key="sk-x", backoff_s=0.5, retry_budget_s=2.0)
        began = time.monotonic()
        results = llm.chat([[{"role": "user", "content": t}] for t in ["a", "poison", "b", "c"]])
        elapsed = time.monotonic() - began
        llm.close()
    assert elapsed < 4
    assert [r.text for r in results] == ["5", None, "5", "5"]
    assert "HTTP 500" in results[1].error and not results[1].service  # its own error, not the service's


def test_retry_resets_exactly_the_rows_asked(store):
    sig = Signal("drill_retry", {})
    examples = frame([make_example([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}])
                      for i in range(6)])
    uids = examples["uid"].to_list()
    final, flaky = set(uids[:2]), set(uids[2:4])
    seen: list[str] = []

    def compute(b):
        seen.extend(b["uid"])
        return BatchResult([Outcome(error="parse: none", raw="?", final=True) if u in final
                            else Outcome(error="HTTP 500") if u in flaky else Outcome(value=1.0) for u in b["uid"]])

    for _ in range(4):
        store.signals.fill(sig, examples, compute, max_attempts=3)
    assert len(seen) == 6 + 2 + 2  # flaky ones used their three attempts; final ones one
    store.catalog.register_signal(sig.id, sig.name, {}, sig.version, sig.kind, "")

    runner = CliRunner()
    out = runner.invoke(app, ["signals", "--retry", sig.id])
    assert out.exit_code == 0 and "2 failed examples" in out.output
    seen.clear()
    store.signals.fill(sig, examples, compute, max_attempts=3)
    assert sorted(seen) == sorted(flaky)  # only the reset rows, once; the final ones left alone

    out = runner.invoke(app, ["signals", "--retry", sig.id[:12], "--final"])  # a prefix names it too
    assert out.exit_code == 0 and "4 failed examples" in out.output
    seen.clear()
    final.clear()
    store.signals.fill(sig, examples, compute, max_attempts=3)
    assert sorted(seen) == sorted(uids[:4])
    assert store.signals.values(sig, uids)["drill_retry"].null_count() == 2  # the flaky ones still fail
    assert runner.invoke(app, ["signals", "--retry", "nosuch"]).exit_code == 2


def test_two_concurrent_runs_pay_for_each_example_once(store, tmp_path):
    register(store, 48)
    with OpenAIServer(lambda r: "4", latency_s=0.05) as server:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
        procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "judge_worker.py"), str(store.home), server.url,
                                   "48"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert server.requests == 48  # every example paid once, by one run or the other
    counts = [list(map(int, o[0].split())) for o in outs]
    assert sum(c[0] for c in counts) == 48


def test_a_selection_short_of_its_budget_because_examples_failed_fails(store, monkeypatch):
    register(store, 10)

    def answer(request):
        if "answer 3" in last_user(request) or "answer 7" in last_user(request):
            raise BadRequest("maximum context length exceeded")
        return rated(request)

    with OpenAIServer(answer) as server:
        point(monkeypatch, server.url)
        with pytest.raises(IncompleteSelection, match="selected 8 of its budget of 10 while 2 examples"):
            alpagasus(AlpaGasusParams(dataset="pool", judge="openai:judge-short", budget=10, threshold=None))
        ref = alpagasus(AlpaGasusParams(dataset="pool", judge="openai:judge-short", budget=10, threshold=None,
                                        allow_partial=True))
        assert ref.rows == 8 and server.requests == 10  # the refused two are final: not asked again
        # a budget the rated examples fill is no failure, though two examples have no rating
        assert alpagasus(AlpaGasusParams(dataset="pool", judge="openai:judge-short", budget=3, threshold=5)).rows == 3


def test_the_judge_is_its_model_and_its_server(monkeypatch):
    from sft_select.tasks.backends.chat import get_llm

    point(monkeypatch, "http://127.0.0.1:8001/v1")
    a = llm_signal(ALPAGASUS["accuracy", "text"], "openai:same-model")
    point(monkeypatch, "http://user:pw@127.0.0.1:8002/v1")
    b = llm_signal(ALPAGASUS["accuracy", "text"], "openai:same-model")
    assert a.id != b.id and b.model == "openai:same-model@127.0.0.1:8002/v1"  # credentials never in a name
    with pytest.raises(ValueError, match="SFT_SELECT_OPENAI_ENDPOINT"):
        get_llm(a.model)  # a's ratings were made on another server than the one configured now
    monkeypatch.setenv("SFT_SELECT_OPENAI_ENDPOINT", "replicas-of-same-model")
    settings.cache_clear()
    c = llm_signal(ALPAGASUS["accuracy", "text"], "openai:same-model")
    point(monkeypatch, "http://127.0.0.1:8001/v1")
    assert llm_signal(ALPAGASUS["accuracy", "text"], "openai:same-model").id == c.id  # declared the same
