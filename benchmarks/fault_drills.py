"""Fault drills with the default settings: how fast a dead judge stops a fill, what it paid, and
whether two concurrent fills pay once. A loopback OpenAI-compatible server (tests/openai_server.py)
plays the judge; the store is a temporary folder.

    python benchmarks/fault_drills.py [examples]

Prints one row per drill: seconds until the fill stopped, requests the server saw, rows stored
(attempts charged to examples). Nothing here asserts; tests/test_failures.py does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ["SFT_SELECT_HOME"] = tempfile.mkdtemp(prefix="sft-select-drills-")

from openai_server import OpenAIServer, last_user  # noqa: E402

from sft_select.settings import settings  # noqa: E402
from sft_select.storage import FillAborted, make_example  # noqa: E402
from sft_select.storage.examples import frame  # noqa: E402
from sft_select.tasks.signal_task import DatasetRef, fill_signal, get_store  # noqa: E402
from sft_select.tasks.judge import Prompt, first_number, llm_batch_of, llm_signal  # noqa: E402

PROMPT = Prompt(name="drill_rating", version="1", template="Rate: {instruction}", max_tokens=8,
                parse=lambda raw: first_number(raw, low=0, high=5))


def point(url: str, key: str) -> None:
    os.environ.update(OPENAI_BASE_URL=url, OPENAI_API_KEY=key)
    settings.cache_clear()


def fill(data: DatasetRef, judge: str) -> tuple[float, str]:
    began = time.perf_counter()
    try:
        ref = fill_signal(llm_signal(PROMPT, judge), data, llm_batch_of, max_attempts=1)
        outcome = f"completed: {ref.computed} computed"
    except FillAborted as e:
        outcome = f"stopped: {str(e).split(': ', 2)[-1][:70]}"
    return time.perf_counter() - began, outcome


def main(n: int) -> None:
    store = get_store()
    rows = [make_example([{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "ok"}])
            for i in range(n)]
    data = DatasetRef.of(store.datasets.register("pool", frame(rows)))
    print(f"{'drill':<34} {'seconds':>8} {'requests':>9} {'rows':>5}  outcome")

    def row(name: str, seconds: float, requests: int, judge: str, outcome: str) -> None:
        stored = store.signals.read(llm_signal(PROMPT, judge)).height
        print(f"{name:<34} {seconds:8.2f} {requests:9d} {stored:5d}  {outcome}")

    with OpenAIServer(lambda r: "4", api_key="sk-right") as server:
        for name, key, fail in [("wrong key (401)", "sk-wrong", 0), ("500 for every request", "sk-right", -1)]:
            judge = f"openai:judge-{name.split()[0]}"
            server.fail_500, before = fail, server.requests
            point(server.url, key)
            seconds, outcome = fill(data, judge)
            time.sleep(0.5)  # requests the breaker cancelled may still be arriving
            row(name, seconds, server.requests - before, judge, outcome)
            server.fail_500, before = 0, server.requests
            point(server.url, "sk-right")
            seconds, outcome = fill(data, judge)
            row("  ... then mended", seconds, server.requests - before, judge, outcome)
    with OpenAIServer() as closed:
        url = closed.url
    point(url, "sk-right")  # nothing listens there any more
    seconds, outcome = fill(data, "openai:judge-unreachable")
    row("unreachable server", seconds, 0, "openai:judge-unreachable", outcome)

    def poison(request) -> str:
        if "Question 7?" in last_user(request):
            raise RuntimeError("fails for this example only")
        return "4"

    with OpenAIServer(poison) as server:
        point(server.url, "sk-right")
        seconds, outcome = fill(data, "openai:judge-poison")
        row("one example always 500", seconds, server.requests, "openai:judge-poison", outcome)

    with OpenAIServer(lambda r: "4", latency_s=0.05) as server:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
        began = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "judge_worker.py"),
                                   os.environ["SFT_SELECT_HOME"], server.url, str(n)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
        outs = [p.communicate()[0].split() for p in procs]
        print(f"{'two concurrent fills of one signal':<34} {time.perf_counter() - began:8.2f} {server.requests:9d} "
              f"{n:5d}  computed by each: {[o[0] if o else '?' for o in outs]}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
