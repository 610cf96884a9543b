"""Fault drill: the CLI stopped mid-run by Ctrl-C (SIGINT to its process group), SIGTERM or kill -9.

The CLI runs as a real process with no PREFECT_API_URL (so it starts its temporary Prefect server)
and rates a pool with a judge on the loopback OpenAI server, slowly. It must stop within seconds,
leave no process behind, mark the flow run crashed, leave the store consistent, and the next run
must pay only for what is missing.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from openai_server import OpenAIServer

from sft_select.storage import Store, read_examples

pytestmark = pytest.mark.slow

POOL = 40
CLI = [str(Path(sys.executable).parent / "sft-select"), "run", "alpagasus", "--dataset", "pool", "--budget", "5",
       "--judge", "openai:judge", "--set", "batch_size=4"]


def _processes_with(marker: bytes) -> list[int]:
    """Pids of live processes whose environment holds ``marker`` (e.g. this drill's PREFECT_HOME)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in environ.split(b"\0") and state != "Z":
            pids.append(int(entry.name))
    return pids


def _wait_gone(marker: bytes, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := _processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    """One Prefect home for the drills: its database is created once (the first server start is the slowest)."""
    return tmp_path_factory.mktemp("prefect")


@pytest.fixture
def drill(tmp_path, prefect_home):
    """A store with a 40-example pool, a slow judge on loopback, and the CLI's environment. Whatever
    process of the drill is left at the end is killed (it has failed the test by then)."""
    home = tmp_path / "home"
    rows = [{"instruction": f"Name fruit number {i}", "input": "", "output": f"Fruit {i} is a plum."}
            for i in range(POOL)]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    Store(home).datasets.register("pool", read_examples(tmp_path / "pool.jsonl").examples)
    with OpenAIServer(answer=lambda request: "4\nclear and correct", latency_s=0.5) as server:
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env.update(SFT_SELECT_HOME=str(home), PREFECT_HOME=str(prefect_home), OPENAI_BASE_URL=server.url,
                   OPENAI_API_KEY="sk-test", SFT_SELECT_OPENAI_CONCURRENCY="2")
        yield home, env, server
    for pid in _processes_with(f"PREFECT_HOME={prefect_home}".encode()):
        os.kill(pid, signal.SIGKILL)


def _start_and_wait_for_a_batch(home: Path, env: dict[str, str]) -> subprocess.Popen:
    """The CLI started in its own session, like a shell job (a signal to its group is what Ctrl-C in a
    terminal sends), once it has stored its first batch. Its output goes to files, not pipes: a
    process it leaves behind must not hold the test waiting for the pipes to close."""
    with (home.parent / "out.txt").open("w") as out, (home.parent / "err.txt").open("w") as err:
        cli = subprocess.Popen(CLI, env=env, stdout=out, stderr=err, start_new_session=True)
    deadline = time.monotonic() + 180
    while not list(home.glob("signals/*/part-*.parquet")):
        assert cli.poll() is None, f"the run ended before it was interrupted: {(home.parent / 'err.txt').read_text()}"
        assert time.monotonic() < deadline, "no batch stored within 180 s"
        time.sleep(0.1)
    return cli


def _last_flow_run_state(env: dict[str, str]) -> str:
    with sqlite3.connect(Path(env["PREFECT_HOME"]) / "prefect.db") as db:
        return db.execute("SELECT state_type FROM flow_run ORDER BY created DESC LIMIT 1").fetchone()[0]


def _stored_rows(home: Path) -> int:
    """Ratings on disk: the parts are the truth (the catalog may not index the last part yet, if the
    signal came between its rename and its catalog insert; the next fill reconciles that)."""
    return sum(pl.read_parquet(p).height for p in home.glob("signals/*/part-*.parquet"))


@pytest.mark.parametrize("signum, code, whole_group", [
    pytest.param(signal.SIGINT, 130, True, id="ctrl-c"), pytest.param(signal.SIGTERM, 143, False, id="sigterm")])
def test_interrupted_run_stops_at_once_and_resumes(drill, signum, code, whole_group):
    home, env, server = drill
    cli = _start_and_wait_for_a_batch(home, env)
    started = time.monotonic()
    if whole_group:
        os.killpg(cli.pid, signum)
    else:
        cli.send_signal(signum)
    try:
        cli.wait(timeout=30)
    except subprocess.TimeoutExpired:
        cli.kill()
    took, err = time.monotonic() - started, (home.parent / "err.txt").read_text()
    print(f"{signal.Signals(signum).name}: the CLI stopped in {took:.1f} s")  # the figure in docs/results.md
    assert took < 10, f"took {took:.1f} s to stop"
    assert cli.returncode == code, err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith(f"stopped by {signal.Signals(signum).name}")
    marker = f"PREFECT_HOME={env['PREFECT_HOME']}".encode()
    assert _wait_gone(marker, 3) == [], "a process of the run (the temporary server) outlived the CLI"
    assert _last_flow_run_state(env) in {"CRASHED", "CANCELLED"}

    assert not [p for p in home.rglob(".tmp-*")], "a torn temporary file was left"
    Store(home).catalog.query("SELECT * FROM signal_parts")  # the catalog opens
    done = _stored_rows(home)
    assert 0 < done < POOL
    if signum != signal.SIGINT:
        return  # resuming is the same after either signal; the drill pays for one rerun
    requests = server.requests
    rerun = subprocess.run(CLI, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert server.requests - requests == POOL - done, "the rerun asked again for ratings already stored"
    assert _stored_rows(home) == POOL and _wait_gone(marker, 3) == []


def test_killed_cli_leaves_no_server(drill):
    home, env, _ = drill
    cli = _start_and_wait_for_a_batch(home, env)
    cli.kill()
    cli.wait(timeout=10)
    marker = f"PREFECT_HOME={env['PREFECT_HOME']}".encode()
    started = time.monotonic()
    # the watchdog gives the server's graceful shutdown GRACE_S (3 s), then exits; a busy machine may add more
    assert _wait_gone(marker, 15) == [], "the temporary server outlived a kill -9 of the CLI"
    print(f"kill -9: the temporary server was gone {time.monotonic() - started:.1f} s after the CLI")
