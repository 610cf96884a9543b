"""The signal store: resumable after SIGKILL, nothing computed twice, errors kept as rows,
concurrent writers, no torn parts."""

from __future__ import annotations

import signal as signals
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from sft_select.storage import BatchResult, Outcome, Signal, Store
from sft_select.storage.examples import frame, make_example

WORKER = Path(__file__).with_name("signal_worker.py")


def _examples(n: int) -> pl.DataFrame:
    return frame([make_example([{"role": "user", "content": f"question {i}"},
                                {"role": "assistant", "content": "answer " * (i % 7 + 1)}]) for i in range(n)])


def _worker(home: Path, name: str, n: int, batch: int, sleep_s: float, calls: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), str(home), name, str(n), str(batch), str(sleep_s),
                             str(calls)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _parts(home: Path, sig: Signal) -> list[Path]:
    return sorted((home / "signals" / sig.id).glob("part-*.parquet"))


def test_sigkill_mid_run_resumes_with_only_the_missing_uids(tmp_path):
    home, calls, n, batch = tmp_path / "home", tmp_path / "calls.txt", 200, 10
    sig = Signal("slow_length", {"n": n})
    proc = _worker(home, sig.name, n, batch, 0.25, calls)
    deadline = time.monotonic() + 60
    while len(_parts(home, sig)) < n // batch // 2:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "worker made no progress"
        time.sleep(0.05)
    proc.send_signal(signals.SIGKILL)
    proc.wait()

    parts = _parts(home, sig)
    done = pl.concat([pl.read_parquet(p) for p in parts])  # every part reads whole: none is torn
    assert done.height == len(parts) * batch and done["uid"].n_unique() == done.height
    calls_before = calls.read_text().split()

    rerun = _worker(home, sig.name, n, batch, 0.0, calls)
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    computed, reused = map(int, out.split())
    assert reused == done.height and computed == n - done.height
    new_calls = calls.read_text().split()[len(calls_before):]
    assert sorted(new_calls) == sorted(set(_examples(n)["uid"]) - set(done["uid"]))  # only the missing ones
    store = Store(home)
    values = store.signals.read(sig)
    assert values.height == n and values["error"].null_count() == n
    assert store.catalog.query("SELECT sum(rows) AS r FROM signal_parts WHERE signal_id = ?", [sig.id])["r"][0] == n


def test_two_processes_computing_different_signals_both_finish(tmp_path):
    home = tmp_path / "home"
    procs = [_worker(home, name, 120, 5, 0.01, tmp_path / f"{name}.txt") for name in ("sig_a", "sig_b")]
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        assert out.split() == ["120", "0"]
    store = Store(home)
    listed = store.catalog.query("SELECT s.name, count(*) AS parts, sum(p.rows) AS rows FROM signals s "
                                 "JOIN signal_parts p USING (signal_id) GROUP BY s.name ORDER BY s.name")
    assert listed.to_dicts() == [{"name": "sig_a", "parts": 24, "rows": 120}, {"name": "sig_b", "parts": 24, "rows": 120}]


def test_errors_are_rows_retried_up_to_max_attempts(tmp_path):
    store = Store(tmp_path / "home")
    sig = Signal("flaky", {"v": 1})
    examples = _examples(6)
    bad = set(examples["uid"][:2])
    seen: list[str] = []

    def compute(b):
        seen.extend(b["uid"])
        return BatchResult([Outcome(error="judge said nothing", raw="??") if u in bad else Outcome(value=1.0)
                            for u in b["uid"]])

    for attempt in range(1, 5):
        report = store.signals.fill(sig, examples, compute, max_attempts=3)
        assert report.errors == (2 if attempt <= 3 else 0)
    assert len(seen) == 6 + 2 + 2  # the failing two were tried three times in all, then left alone
    values = store.signals.read(sig)
    failed = values.filter(pl.col("error").is_not_null())
    assert set(failed["uid"]) == bad and failed["raw"].to_list() == ["??", "??"]
    assert failed["attempts"].to_list() == [3, 3] and failed["value"].null_count() == 2

    bad.clear()  # a later run with a higher limit recovers them; the value then wins over old errors
    store.signals.fill(sig, examples, compute, max_attempts=4)
    assert store.signals.read(sig)["error"].null_count() == 6
    assert store.signals.values(sig, examples["uid"])["flaky"].to_list() == [1.0] * 6


def test_mismatched_batch_is_refused_before_anything_is_written(tmp_path):
    store = Store(tmp_path / "home")
    sig = Signal("broken", {})
    with pytest.raises(ValueError, match="2 outcomes for 3 uids"):
        store.signals.fill(sig, _examples(3), lambda b: BatchResult.of([1.0, 2.0]), batch_size=3)
    assert not _parts(store.home, sig)


def test_signal_identity_is_name_params_version():
    a = Signal("rating", {"model": "m", "prompt": "p"})
    assert a.id == Signal("rating", {"prompt": "p", "model": "m"}).id  # canonical JSON: key order is irrelevant
    assert a.id != Signal("rating", {"model": "m2", "prompt": "p"}).id
    assert a.id != Signal("rating", {"model": "m", "prompt": "p"}, version="2").id
    with pytest.raises(ValueError):
        Signal("Bad Name; DROP", {})


def test_vector_and_tag_signals_round_trip(tmp_path):
    store = Store(tmp_path / "home")
    examples = _examples(4)
    vec = Signal("vec", {"d": 3}, kind="vector")
    tags = Signal("tags", {}, kind="tags")
    store.signals.fill(vec, examples, lambda b: BatchResult.of([[1.0, 0.0, float(i)] for i in range(b.height)]))
    store.signals.fill(tags, examples, lambda b: BatchResult.of([["math", "short"]] * b.height))
    v = store.signals.values(vec, examples["uid"])
    assert v["vec"].to_list()[2] == [1.0, 0.0, 2.0] and v["vec"].dtype == pl.Array(pl.Float32, 3)
    matrix, present = store.signals.matrix(vec, [examples["uid"][3], "absent", examples["uid"][0]])
    assert matrix.dtype == np.float32 and matrix.shape == (3, 3) and present.tolist() == [True, False, True]
    assert matrix[0].tolist() == [1.0, 0.0, 3.0] and np.isnan(matrix[1]).all()
    assert store.signals.values(tags, examples["uid"])["tags"].to_list()[0] == ["math", "short"]


def test_final_errors_are_not_retried(tmp_path):
    store = Store(tmp_path / "home")
    sig = Signal("greedy_parse", {})
    examples = _examples(3)
    seen: list[str] = []

    def compute(b):
        seen.extend(b["uid"])
        return BatchResult([Outcome(error="parse: no score", raw="I think so.", final=True)] * b.height)

    store.signals.fill(sig, examples, compute)
    store.signals.fill(sig, examples, compute)
    assert len(seen) == 3  # asking again cannot change a greedy answer: asked once
    assert store.signals.read(sig)["final"].to_list() == [True] * 3
