"""The ingest flow, the baselines, the signal-task glue and the CLI, on a real Prefect API."""

from __future__ import annotations

import json

import pytest
from prefect import flow
from typer.testing import CliRunner

from sft_select.flows.cli import app
from sft_select.flows.ingest import IngestParams, ingest
from sft_select.flows.longest import LongestParams, longest
from sft_select.flows.random_subset import RandomParams, random_subset
from sft_select.storage import BatchResult, Outcome, Signal, read_examples
from sft_select.tasks.signal_task import DatasetRef, signal_task

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture
def pool(tmp_path, store):
    rows = [{"instruction": f"Task {i}", "input": "", "output": "word " * (i + 1)} for i in range(40)]
    rows.append({"instruction": "broken", "output": ""})
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(rows))
    return path


def test_ingest_flow_registers_and_keeps_rejects(pool, store):
    ref = ingest(IngestParams(path=str(pool), name="pool", on_error="skip"))
    assert (ref.name, ref.version, ref.rows) == ("pool", 1, 40)
    rejects = (store.home / "rejects" / "pool-v1.jsonl").read_text().splitlines()
    assert len(rejects) == 1 and json.loads(rejects[0])["record"] == 40
    report = store.catalog.query("SELECT report FROM datasets WHERE name = 'pool'")["report"][0]
    assert json.loads(report)["rejected"] == 1
    with pytest.raises(Exception, match="record 40, field 'output': empty"):
        ingest(IngestParams(path=str(pool), name="pool2"))


def test_baselines_save_selection_and_training_file(pool, store):
    ingest(IngestParams(path=str(pool), name="pool", on_error="skip"))
    top = longest(LongestParams(dataset="pool", budget=0.25))
    assert top.rows == 10
    chosen = store.selections.read(top.selection_id)
    assert chosen["score"].to_list() == sorted(chosen["score"].to_list(), reverse=True)
    assert chosen["score"][0] == len(("word " * 40).strip())
    exported = read_examples(top.export_path).examples  # a file training tools (LLaMA-Factory alpaca) read
    assert exported.height == 10 and exported["uid"].to_list() == chosen["uid"].to_list()

    a = random_subset(RandomParams(dataset="pool", budget=5, seed=1))
    b = random_subset(RandomParams(dataset="pool", budget=5, seed=1))
    c = random_subset(RandomParams(dataset="pool", budget=5, seed=2))
    ua, ub, uc = (store.selections.read(r.selection_id)["uid"].to_list() for r in (a, b, c))
    assert ua == ub and ua != uc and len(set(ua)) == 5
    assert set(store.selections.list()["method"]) == {"longest", "random"}


def test_signal_task_is_cached_on_content_and_retries_failed_examples(pool, store):
    ref = ingest(IngestParams(path=str(pool), name="pool", on_error="skip"))
    calls: list[str] = []
    fail_once: set[str] = set(ref.read(["uid"])["uid"][:3])

    def build(signal):
        def compute(batch):
            calls.extend(batch["uid"])
            out = []
            for uid, text in zip(batch["uid"], batch["output"]):
                if uid in fail_once:
                    fail_once.discard(uid)
                    out.append(Outcome(error="transient"))
                else:
                    out.append(Outcome(value=float(len(text))))
            return BatchResult(out, {"calls": batch.height})
        return compute

    length = signal_task("length", build, batch_size=8, retry_delay_seconds=[0, 0])
    sig = Signal("out_len", {"unit": "chars"})

    @flow
    def score(dataset: DatasetRef):
        return length(sig, dataset)

    first = score(ref)
    assert first.errors == 0 and first.rows == 40
    assert len(calls) == 40 + 3  # the three failures were retried by the task's retry, and only they
    second = score(ref)  # same signal and content: the cached reference, no compute
    assert len(calls) == 43 and second.signal_id == first.signal_id
    values = store.signals.values(sig, ref.read(["uid"])["uid"])
    assert values["out_len"].null_count() == 0

    listed = CliRunner().invoke(app, ["signals"])  # what each signal cost: rows and errors of every attempt
    assert listed.exit_code == 0, listed.output
    row = next(line for line in listed.output.splitlines() if sig.id in line)
    assert [int(x) for x in row.replace("│", " ").replace("┆", " ").split()[-2:]] == [43, 3]


def test_cli_ingest_run_export_and_clear_errors(pool, store, tmp_path):
    runner = CliRunner()
    bad = runner.invoke(app, ["ingest", str(pool), "--name", "pool"])
    assert bad.exit_code == 2 and "record 40, field 'output': empty" in bad.output
    assert bad.output.strip().splitlines()[-1].endswith("(--on-error skip sets such records aside and keeps the rest)")
    ok = runner.invoke(app, ["ingest", str(pool), "--name", "pool", "--on-error", "skip"])
    assert ok.exit_code == 0, ok.output
    assert "pool" in runner.invoke(app, ["datasets"]).output
    ran = runner.invoke(app, ["run", "longest", "--dataset", "pool", "--budget", "3"])
    assert ran.exit_code == 0, ran.output
    selection_id = store.selections.list()["selection_id"][0]
    out = tmp_path / "sel.jsonl"
    exported = runner.invoke(app, ["export", selection_id, "--to", "messages", str(out)])
    assert exported.exit_code == 0, exported.output
    assert len(out.read_text().splitlines()) == 3
    unknown = runner.invoke(app, ["run", "nope", "--dataset", "pool"])
    assert unknown.exit_code == 2 and "unknown method 'nope'" in unknown.output
    missing = runner.invoke(app, ["run", "random", "--dataset", "nothere"])
    assert missing.exit_code == 2 and "no dataset named 'nothere'" in missing.output


def test_the_summary_shows_what_was_selected_and_a_score_histogram(pool, store):
    import asyncio

    import polars as pl
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import ArtifactSort

    from sft_select.tasks.report import histogram_rows

    ingest(IngestParams(path=str(pool), name="pool", on_error="skip"))
    top = longest(LongestParams(dataset="pool", budget=3))

    async def markdowns() -> list[str]:
        async with get_client() as client:
            newest = await client.read_artifacts(sort=ArtifactSort.CREATED_DESC, limit=50)
            return [a.data for a in newest if a.type == "markdown"]

    mds = [m for m in asyncio.run(markdowns()) if top.selection_id in m]  # (ids are content: earlier tests' too)
    assert mds and all("| 1 | Task 39 | word word word" in md for md in mds)  # the example, not its uid
    # ratings: one row per value; continuous scores: equal-width bins; failures: a row of their own
    assert [r["value"] for r in histogram_rows(pl.Series([4.0, 5.0, 5.0, None]))] == ["4", "5", "no value (error)"]
    bins = histogram_rows(pl.Series([i / 10 for i in range(100)]), bins=4)
    assert [r["examples"] for r in bins] == [25, 25, 25, 25] and bins[-1]["value"].endswith("]")
