"""Scale-out on real engines: one local Ray instance (2 CPUs) and one Dask LocalCluster (2 worker
processes) for the whole module, a real S3-compatible server (moto's server mode), the loopback
OpenAI server, and a real tmpfs that fills. Signals are filled in shards by Prefect's RayTaskRunner
and DaskTaskRunner (tasks/scale.py) and compared with the in-process fill."""

from __future__ import annotations

import json
import os
import signal as signals
import subprocess
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

pytest.importorskip("prefect_ray", reason="the scale extra is not installed")
pytest.importorskip("prefect_dask", reason="the scale extra is not installed")

from fruit_pool import fruit_pool  # noqa: E402
from openai_server import BadRequest, last_user, serving  # noqa: E402
from tiny_lm import build_tiny_llama  # noqa: E402

from sft_select.settings import settings  # noqa: E402
from sft_select.storage import Store, StoreFull  # noqa: E402
from sft_select.storage.fs import duckdb_connection  # noqa: E402
from sft_select.tasks.embed import build_embed, by_length, embed_signal  # noqa: E402
from sft_select.tasks.judge import llm_batch_of, llm_signal  # noqa: E402
from sft_select.tasks.lm_loss import build_lm_loss, lm_loss_signal  # noqa: E402
from sft_select.tasks.prompts import ALPAGASUS  # noqa: E402
from sft_select.tasks.scale import Scale, scale_out  # noqa: E402
from sft_select.tasks.signal_task import DatasetRef, fill_signal, get_store  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]
BUCKET = "sft-select-test"


def _children() -> set[int]:
    """Processes under this one, less multiprocessing's resource tracker (one per interpreter, started
    by the first process pool and ending with the interpreter: not a worker left behind)."""
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)
            if "resource_tracker" not in " ".join(p.cmdline())}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """A moto S3 server, a Ray instance and a Dask LocalCluster, started once. Workers inherit the
    environment set here (S3 endpoint and test credentials, a test API key, one torch thread)."""
    import ray
    from dask.distributed import LocalCluster
    from moto.server import ThreadedMotoServer

    before = _children()
    mp = pytest.MonkeyPatch()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    host, port = s3.get_host_and_port()
    for k, v in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "OPENAI_API_KEY": "sk-test-judge",
                 "SFT_SELECT_TORCH_THREADS": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}.items():
        mp.setenv(k, v)
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    ray.init(num_cpus=2, include_dashboard=False, namespace="prefect", log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    try:
        yield {"ray": Scale(task_runner="ray"), "dask": Scale(task_runner="dask", address=cluster.scheduler_address),
               "_stop": (ray, cluster, s3, before)}
    finally:
        ray.shutdown()
        cluster.close()
        s3.stop()
        mp.undo()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny):
    """The in-process fill of both signals (the values every engine must reproduce)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SFT_SELECT_HOME", str(tmp_path_factory.mktemp("reference")))
    mp.setenv("SFT_SELECT_TORCH_THREADS", "1")
    settings.cache_clear()
    try:
        pool = fruit_pool()
        ref = DatasetRef.of(get_store().datasets.register("fruit", pool))
        out = {}
        for sig, build in _signals(tiny):
            fill_signal(sig, ref, build, batch_size=4, order_by=by_length)
            out[sig.id] = get_store().signals.read(sig, pool["uid"]).sort("uid")
        return pool, out
    finally:
        mp.undo()
        settings.cache_clear()


def _signals(tiny: str):
    return [(embed_signal(tiny, pooling="mean", max_tokens=64), build_embed),
            (lm_loss_signal(tiny, max_length=64), build_lm_loss)]


def _parts(store: Store, sig) -> list:
    return store.signals._parts(sig)


def _check_parts(store: Store, sig, uids: set[str]) -> None:
    """Every uid in exactly one part, no temporary file left, and the catalog lists every part."""
    parts = _parts(store, sig)
    stored = pl.concat([store.signals._read([p], ["uid"]).collect() for p in parts])["uid"]
    assert stored.len() == stored.n_unique() == len(uids) and set(stored) == uids
    listed = store.catalog.query("SELECT path, rows FROM signal_parts WHERE signal_id = ?", [sig.id])
    assert set(listed["path"]) == {store.signals._rel(p) for p in parts} and listed["rows"].sum() == len(uids)
    if store.signals.fs is None:
        assert not list(Path(store.signals.dir(sig)).glob(".tmp-*"))


@pytest.mark.parametrize("engine", ["ray", "dask"])
def test_sharded_fill_matches_the_in_process_fill(engine, engines, reference, tiny, store):
    pool, expected = reference
    ref = DatasetRef.of(store.datasets.register("fruit", pool))
    with scale_out(engines[engine].model_copy(update={"shards": 3})):
        for sig, build in _signals(tiny):
            got = fill_signal(sig, ref, build, batch_size=4, order_by=by_length)
            assert (got.computed, got.reused, got.errors) == (pool.height, 0, 0)
            values = store.signals.read(sig, pool["uid"]).sort("uid")
            assert values["uid"].to_list() == expected[sig.id]["uid"].to_list()
            # the same batches as the in-process fill, so the same values up to float32 rounding: a worker's
            # torch may use another thread count than this process, and a matmul summed in another order
            # differs in its last bits
            np.testing.assert_allclose(np.stack(values["value"].to_list()).astype(np.float64),
                                       np.stack(expected[sig.id]["value"].to_list()).astype(np.float64),
                                       rtol=1e-5, atol=1e-6)
            _check_parts(store, sig, set(pool["uid"]))
            assert len(_parts(store, sig)) == 6  # 24 examples in batches of 4, spread over 3 shards
            cost = store.catalog.query("SELECT seconds FROM signals WHERE signal_id = ?", [sig.id])["seconds"][0]
            assert cost > 0  # each part's cost travelled in its metadata to the catalog
            again = fill_signal(sig, ref, build, batch_size=4)
            assert (again.computed, again.reused) == (0, pool.height)


def _judge_pool(n: int = 20) -> pl.DataFrame:
    from sft_select.storage import make_example
    from sft_select.storage.examples import frame

    return frame([make_example([{"role": "user", "content": f"Question number {i}: name a fruit."},
                                {"role": "assistant", "content": f"Answer {i}: a plum."}]) for i in range(n)])


def test_judge_across_workers_with_30_percent_faults_pays_each_example_once(engines, store, monkeypatch):
    """Three examples in ten fail: a refused request (400) or an answer with no score. Every example
    is asked exactly once, every failure is a stored row with its error."""
    pool = _judge_pool(20)
    paid: dict[int, int] = {}

    def answer(request):
        i = int(last_user(request).split("Question number ")[1].split(":")[0])
        paid[i] = paid.get(i, 0) + 1
        if i % 10 in (1, 4):
            raise BadRequest("this example is refused")
        if i % 10 == 7:
            return "no score here"
        return "4\nfine"

    with serving(answer, monkeypatch):
        ref = DatasetRef.of(store.datasets.register("questions", pool))
        sig = llm_signal(ALPAGASUS["accuracy", "text"], "openai:judge")
        with scale_out(engines["dask"].model_copy(update={"shards": 2})):
            got = fill_signal(sig, ref, llm_batch_of, batch_size=4, max_attempts=1)
    assert paid == {i: 1 for i in range(20)}
    assert (got.computed, got.errors) == (20, 6)
    rows = store.signals.read(sig, pool["uid"])
    failed = rows.filter(pl.col("error").is_not_null())
    assert failed.height == 6 and failed["raw"].is_null().sum() == 4  # the refusals have no answer text
    calls = store.catalog.query("SELECT calls FROM signals WHERE signal_id = ?", [sig.id])["calls"][0]
    assert calls == got.usage["calls"] >= 14  # what the shards paid reached the catalog with their parts
    _check_parts(store, sig, set(pool["uid"]))


def test_a_worker_killed_mid_fill_loses_at_most_its_batch(engines, store, monkeypatch):
    """SIGKILL the Ray worker that holds a batch's lease: Ray runs its shard again elsewhere, and only
    the killed batch is asked twice; a re-run computes nothing; no part is torn."""
    pool = _judge_pool(24)
    paid: dict[int, int] = {}

    def answer(request):
        i = int(last_user(request).split("Question number ")[1].split(":")[0])
        paid[i] = paid.get(i, 0) + 1
        return "5\nright"

    with serving(answer, monkeypatch, latency_s=0.4) as server:
        ref = DatasetRef.of(store.datasets.register("questions", pool))
        sig = llm_signal(ALPAGASUS["accuracy", "text"], "openai:judge")
        leases = Path(store.signals.dir(sig)) / ".leases"
        killed: dict = {}

        def kill_one() -> None:  # the holder of the first lease seen after two parts exist
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not killed:
                if len(_parts(store, sig)) >= 2:
                    for path in leases.glob("lease-*.json"):
                        lease = json.loads(path.read_text())
                        os.kill(lease["pid"], signals.SIGKILL)
                        killed.update(lease)
                        return
                time.sleep(0.05)

        import threading

        killer = threading.Thread(target=kill_one)
        killer.start()
        with scale_out(engines["ray"].model_copy(update={"shards": 2})):
            try:
                first = fill_signal(sig, ref, llm_batch_of, batch_size=2)
            except Exception as e:  # failing cleanly is allowed; retrying cleanly too
                first = e
        killer.join()
        assert killed, "no lease was seen to kill its holder"
        with pytest.raises(ProcessLookupError):
            os.kill(killed["pid"], 0)
        stored = store.signals.read(sig)["uid"].n_unique()
        again = fill_signal(sig, ref, llm_batch_of, batch_size=2)
        assert again.computed == 24 - stored  # a re-run computes only what is missing
        twice = {i for i, n in paid.items() if n > 1}
        pool_uids = pool["uid"].to_list()
        assert {pool_uids[i] for i in twice} <= set(killed["uids"])  # only the killed batch was paid again
        assert sum(paid.values()) == 24 + len(twice) == server.completions
        if not isinstance(first, Exception):  # retried cleanly: the shard's second attempt counts what its
            assert first.computed + first.by_others == 24 and again.computed == 0  # killed first attempt stored
    _check_parts(store, sig, set(pool_uids))


def test_signal_parts_on_s3_are_written_by_workers_and_read_by_duckdb(engines, reference, tiny, store, monkeypatch):
    pool, expected = reference
    monkeypatch.setenv("SFT_SELECT_SIGNALS_URL", f"s3://{BUCKET}/signals")
    settings.cache_clear()
    s3store = get_store()
    assert s3store.signals.url == f"s3://{BUCKET}/signals"
    ref = DatasetRef.of(s3store.datasets.register("fruit", pool))
    sig, build = _signals(tiny)[1]
    with scale_out(engines["dask"].model_copy(update={"shards": 2})):
        got = fill_signal(sig, ref, build, batch_size=4, order_by=by_length)
    assert got.computed == pool.height
    values = s3store.signals.read(sig, pool["uid"]).sort("uid")
    np.testing.assert_allclose(values["value"].to_numpy(), expected[sig.id]["value"].to_numpy(), rtol=1e-5)  # as above
    _check_parts(s3store, sig, set(pool["uid"]))
    con = duckdb_connection(s3store.signals.url)
    [(n, unique)] = con.sql(f"SELECT count(*), count(DISTINCT uid) FROM read_parquet('{s3store.signals.url}/"
                            f"{sig.id}/part-*.parquet')").fetchall()
    assert n == unique == pool.height
    import boto3

    listing = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=f"signals/{sig.id}/")
    keys = [o["Key"] for o in listing["Contents"]]
    assert not [k for k in keys if "/.leases/" in k and not k.endswith("lock")]  # every lease released


def test_a_full_disk_during_a_part_write_is_a_clear_error_and_resumes(tmp_path, tiny, reference, store, monkeypatch):
    """A real tmpfs too small for every part: the write that fills it fails with one clear error, the
    half-written file is removed, and after the filesystem grows the fill computes only the rest."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    pool, expected = reference
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        monkeypatch.setenv("SFT_SELECT_SIGNALS_URL", str(disk / "signals"))
        settings.cache_clear()
        small = get_store()
        ref = DatasetRef.of(small.datasets.register("fruit", pool))
        sig, build = _signals(tiny)[0]  # 24 vectors of 32 floats, a part (one 4 KiB page) per 4
        with pytest.raises(StoreFull, match="no space left in .* nothing is torn: free space and run again"):
            fill_signal(sig, ref, build, batch_size=4, order_by=by_length)
        parts = _parts(small, sig)
        assert 0 < len(parts) < 6 and not list(Path(small.signals.dir(sig)).glob(".tmp-*"))
        stored = pl.concat([pl.read_parquet(p) for p in parts])  # every part whole
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        again = fill_signal(sig, ref, build, batch_size=4, order_by=by_length)
        assert again.computed == pool.height - stored.height and again.reused == stored.height
        values = small.signals.read(sig, pool["uid"]).sort("uid")
        assert np.array_equal(np.stack(values["value"].to_list()), np.stack(expected[sig.id]["value"].to_list()))
        _check_parts(small, sig, set(pool["uid"]))
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_engines_stop_and_leave_no_process_behind(engines):
    ray, cluster, s3, before = engines["_stop"]
    ray.shutdown()
    cluster.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _children() - before:
        time.sleep(0.2)
    import psutil

    left = [" ".join(psutil.Process(pid).cmdline())[:120] for pid in _children() - before if psutil.pid_exists(pid)]
    assert not left, left
