"""The derived store: get-or-compute by content key (nothing computed twice), atomic files, a catalog
row per result, reconciled after a process is killed between the write and the catalog insert."""

from __future__ import annotations

import signal as signals
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from sft_select.storage import Store, derived_key

WORKER = Path(__file__).with_name("derived_worker.py")


def counted(payload):
    """A compute function that returns ``payload`` and counts its calls."""
    calls: list[int] = []

    def compute():
        calls.append(1)
        return payload

    return compute, calls


def rows(store: Store) -> pl.DataFrame:
    return store.catalog.query("SELECT kind, key, path, format, rows, params FROM derived ORDER BY kind")


def test_a_result_is_computed_once_and_found_again_by_its_inputs_content(tmp_path):
    store = Store(tmp_path / "home")
    frame = pl.DataFrame({"uid": ["a", "b", "c"], "cluster": [0, 1, 0]})
    compute, calls = counted((frame, {"anchors": ["a", "b"], "inertia": float("nan")}))
    first = store.derived.get_or_compute("kmeans", {"dataset": "fp-1", "k": 2}, compute)
    again = store.derived.get_or_compute("kmeans", {"k": 2, "dataset": "fp-1"}, compute)  # key order is no input
    assert len(calls) == 1 and not first.reused and again.reused
    assert again.read().equals(frame) and again.path == first.path and again.rows == 3
    assert again.meta["anchors"] == ["a", "b"] and np.isnan(again.meta["inertia"])
    assert first.path == tmp_path / "home" / "derived" / "kmeans" / f"{first.key}.parquet"
    assert not [p for p in first.path.parent.iterdir() if p.name.startswith(".")]  # no temporary file left

    store.derived.get_or_compute("kmeans", {"dataset": "fp-1", "k": 3}, compute)  # other inputs: computed
    store.derived.get_or_compute("kmeans", {"dataset": "fp-1", "k": 2}, compute, version="2")  # other version
    assert len(calls) == 3

    compute_json, json_calls = counted({"added": ["a"], "radius": 0.5})
    compute_npy, npy_calls = counted(np.arange(6, dtype=np.float32).reshape(3, 2))
    for _ in range(2):
        got_json = store.derived.get_or_compute("round", {"selected": "fp-2"}, compute_json, fmt="json")
        got_npy = store.derived.get_or_compute("centroids", {"dataset": "fp-1"}, compute_npy, fmt="npy")
    assert (len(json_calls), len(npy_calls)) == (1, 1)
    assert got_json.read() == {"added": ["a"], "radius": 0.5}
    np.testing.assert_array_equal(got_npy.read(), np.arange(6, dtype=np.float32).reshape(3, 2))

    listed = rows(store)  # one catalog row per result, with its inputs
    assert listed["kind"].to_list() == ["centroids", "kmeans", "kmeans", "kmeans", "round"]
    assert listed.filter(pl.col("key") == first.key)["params"][0] == '{"dataset":"fp-1","k":2,"version":"1"}'
    assert first.key == derived_key("kmeans", {"dataset": "fp-1", "k": 2})

    first.path.unlink()  # a result whose file is gone is computed again, and its row rewritten
    assert not store.derived.get_or_compute("kmeans", {"dataset": "fp-1", "k": 2}, compute).reused
    assert len(calls) == 4 and rows(store).height == 5


def _worker(home: Path, calls: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), str(home), str(calls), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_result_written_by_a_process_killed_before_its_catalog_insert_is_found_and_indexed(tmp_path):
    home, calls = tmp_path / "home", tmp_path / "calls.txt"
    proc = _worker(home, calls, "hang")
    assert proc.stdout.readline().strip() == "written", proc.stderr.read()  # renamed, catalog insert not done
    proc.send_signal(signals.SIGKILL)
    proc.wait()
    (written,) = (home / "derived" / "toy").iterdir()
    assert rows(Store(home)).height == 0 and calls.read_text() == "computed\n"

    fresh = _worker(home, calls)  # a fresh process finds the file, indexes it and computes nothing
    out, err = fresh.communicate(timeout=120)
    assert fresh.returncode == 0, err
    assert out.split() == ["reused", "3"] and calls.read_text() == "computed\n"
    indexed = rows(Store(home))
    assert indexed.height == 1 and indexed["path"][0] == f"derived/toy/{written.name}"
    assert indexed["params"][0] == '{"dataset":"fp-1","k":2,"version":"1"}'


def test_list_reconciles_unindexed_files_and_the_cli_prints_them(tmp_path, monkeypatch):
    from sft_select.flows.cli import app
    from sft_select.settings import settings
    from sft_select.tasks.signal_task import get_store

    monkeypatch.setenv("SFT_SELECT_HOME", str(tmp_path / "home"))
    settings.cache_clear()
    try:
        store = get_store()
        assert "No derived results yet" in CliRunner().invoke(app, ["derived"]).output
        found = store.derived.get_or_compute("dq-bins", {"dataset": "fp-3"}, lambda: pl.DataFrame({"uid": ["x"]}))
        store.catalog.execute("DELETE FROM derived")  # as if the insert never happened
        listed = store.derived.list()
        assert listed.select("kind", "key", "rows").rows() == [("dq-bins", found.key, 1)]
        assert listed["params"][0] is None  # who computed it is not known any more; the file is
        result = CliRunner().invoke(app, ["derived"])
        assert result.exit_code == 0 and "dq-bins" in result.output and found.key in result.output
    finally:
        settings.cache_clear()


def test_unknown_formats_and_wrong_payloads_are_refused(tmp_path):
    store = Store(tmp_path / "home")
    with pytest.raises(ValueError, match="unknown derived format"):
        store.derived.put("x", "k", {"a": 1}, fmt="pickle")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="polars DataFrame"):
        store.derived.put("x", "k", {"a": 1}, fmt="parquet")
    assert not list((tmp_path / "home" / "derived" / "x").iterdir())  # nothing half-written left behind
