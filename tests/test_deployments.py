"""Deployments end to end: a real `prefect server start` on a free loopback port, the deploy script,
a process worker, and flow runs created the way the UI's Run button creates them
(``POST /api/deployments/{id}/create_flow_run``). Every process runs in its own process group with
PREFECT_HOME and SFT_SELECT_HOME in the test's temporary folder, and is stopped at the end, also on
failure."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

from sft_select.flows.demo import DEMO_POOL
from sft_select.flows.registry import METHODS, OTHER_FLOWS, load_flow
from sft_select.storage import Store, read_examples

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deployments" / "deploy.py"
LONG_GOOD = range(75, 80)  # the demo pool's five very long, good answers (see flows/data/README.md)
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(log: Path, lines: int = 40) -> str:
    text = log.read_text(errors="replace") if log.exists() else "(no log)"
    return f"--- last lines of {log.name} ---\n" + "\n".join(text.splitlines()[-lines:])


def _wait_for(check: Callable[[], Any], timeout_s: float, what: str, *logs: Path) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` and showing the logs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{what} within {timeout_s:.0f} s\n" + "\n".join(_tail(log) for log in logs))


class Processes:
    """Processes started by the test, each in its own session (process group), stopped in reverse order."""

    def __init__(self, folder: Path, env: dict[str, str]):
        self.folder, self.env = folder, env
        self.started: list[tuple[subprocess.Popen, Path]] = []

    def start(self, name: str, *args: str) -> Path:
        log = self.folder / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "prefect", *args], env=self.env, cwd=self.folder,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.started.append((proc, log))
        return log

    def stop_all(self) -> None:
        for proc, _ in reversed(self.started):  # the worker before the server it reports to
            if proc.poll() is not None:
                continue
            for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(wait_s)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Processes]]:
    """A real Prefect server with its own PREFECT_HOME; yields its API URL and the process list."""
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SFT_SELECT_"))}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_API_URL=api,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1",  # poll for scheduled runs every second, not every ten
        SFT_SELECT_HOME=str(tmp_path / "home"),
        SFT_SELECT_TORCH_THREADS="1",
    )
    procs = Processes(tmp_path, env)
    try:
        log = procs.start("server", "server", "start", "--host", "127.0.0.1", "--port", str(port))
        _wait_for(lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200, 120,
                  "the Prefect server did not answer /api/health", log)
        yield api, procs
    finally:
        procs.stop_all()


def _create_flow_run(api: str, deployment: str, parameters: dict[str, Any]) -> tuple[int, dict]:
    """What the UI's Run button does: create a flow run of a deployment with these parameters."""
    deployment_id = httpx.get(f"{api}/deployments/name/{deployment}", timeout=10).raise_for_status().json()["id"]
    r = httpx.post(f"{api}/deployments/{deployment_id}/create_flow_run", json={"parameters": parameters}, timeout=10)
    return r.status_code, r.json()


def _run(api: str, deployment: str, parameters: dict[str, Any], worker_log: Path) -> dict:
    status, run = _create_flow_run(api, deployment, parameters)
    assert status == 201, f"{deployment}: create_flow_run answered {status}: {run}"

    def finished() -> dict | None:
        state = httpx.get(f"{api}/flow_runs/{run['id']}", timeout=10).raise_for_status().json()
        return state if state["state_type"] in TERMINAL else None

    done = _wait_for(finished, 180, f"flow run {run['name']} of {deployment} did not finish", worker_log)
    assert done["state_type"] == "COMPLETED", f"{deployment}: {done['state']['message']}\n{_tail(worker_log)}"
    return done


def test_deployments_run_from_the_ui_on_a_real_server(server: tuple[str, Processes], tmp_path: Path) -> None:
    api, procs = server

    # every flow of the registry becomes a deployment on a process work pool
    deploy = subprocess.run([sys.executable, str(DEPLOY)], env=procs.env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=180)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    listed = httpx.post(f"{api}/deployments/filter", json={}, timeout=10).raise_for_status().json()
    by_flow = {load_flow(name).name: name for name in [*OTHER_FLOWS, *METHODS]}
    entrypoints = {d["entrypoint"] for d in listed}
    assert len(listed) == len(by_flow)
    for flow_name, name in by_flow.items():
        flow = load_flow(name)
        assert f"{flow.fn.__module__}.{flow.fn.__name__}" in entrypoints, f"no deployment runs {name}"
    assert all(d["work_pool_name"] == "sft-select" and not d["pull_steps"] for d in listed)
    nightly = [s for d in listed for s in d["schedules"]]
    assert [s["schedule"]["cron"] for s in nightly] == ["0 2 * * *"]

    # the server enforces each deployment's parameter schema, as the UI's form does
    status, answer = _create_flow_run(api, "longest/default", {"params": {"dataset": "demo", "budget": "lots"}})
    assert status == 409 and "params.budget" in answer["detail"]
    status, answer = _create_flow_run(api, "alpagasus/default", {"params": {"dataset": "demo", "treshold": 4}})
    assert status == 409 and "treshold" in answer["detail"]  # a typo never runs with the default

    worker_log = procs.start("worker", "worker", "start", "--pool", "sft-select")

    # ingest the demo pool with the ingest deployment's defaults ("Quick run")
    ingested = _run(api, "ingest/default", {}, worker_log)
    store = Store(tmp_path / "home")
    assert store.datasets.get("demo").rows == 150

    # the project's own log lines reach the run's logs in the UI, as Prefect's do
    def project_line() -> bool:
        logs = httpx.post(f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [ingested["id"]]}}},
                          timeout=10).raise_for_status().json()
        return any(entry["name"] == "sft_select" and "demo@1: 150 examples" in entry["message"] for entry in logs)

    _wait_for(project_line, 30, "the ingest run's own log line in the API", worker_log)

    # a selection method run with parameters filled in the form
    run = _run(api, "longest/default", {"params": {"dataset": "demo", "budget": 10}}, worker_log)
    selections = store.selections.list()
    row = selections.row(by_predicate=pl.col("flow_run_id") == run["id"], named=True)
    assert (row["method"], row["dataset"], row["rows"]) == ("longest", "demo@1", 10)
    pool = read_examples(DEMO_POOL).examples
    long_good = set(pool["uid"].gather(list(LONG_GOOD)))
    assert set(store.selections.read(row["selection_id"])["uid"].head(len(LONG_GOOD))) == long_good

    # a signal filled in shards on a Dask cluster that the run's parameters choose (tasks/scale.py)
    run = _run(api, "fill-signal/default",
               {"params": {"dataset": "demo", "signal": "embed", "task_runner": "dask", "workers": 2,
                           "batch_size": 32}}, worker_log)
    from sft_select.flows.fill import FillParams, signal_of

    signal, _ = signal_of(FillParams(dataset="demo"))
    parts = store.signals._parts(signal)
    uids = pl.concat([pl.read_parquet(p, columns=["uid", "error"]) for p in parts])
    assert uids["uid"].n_unique() == uids.height == 150 and uids["error"].null_count() == 150
    listed = store.catalog.query("SELECT path FROM signal_parts WHERE signal_id = ?", [signal.id])["path"]
    assert sorted(listed) == sorted(store.signals._rel(p) for p in parts) and len(parts) >= 2
    logs = httpx.post(f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [run["id"]]}}},
                      timeout=10).raise_for_status().json()
    assert any("shards on dask" in entry["message"] for entry in logs)
