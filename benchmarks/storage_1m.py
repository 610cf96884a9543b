"""Storage at scale: ingest a synthetic 1,000,000-example pool, write and read back a float signal
and a 384-d vector signal. Each step runs in its own process so its peak RSS is its own.

    python benchmarks/storage_1m.py [--n 1000000]

Targets (issue 2): peak RSS of every step under 3 GB; reading one score column for 1M uids under 1 s.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STEPS = ["ingest", "write_float", "write_vector", "read_float", "read_vector"]


def step(name: str, home: Path, n: int) -> dict:
    from sft_select.storage import BatchResult, Signal, Store, read_examples

    store = Store(home)
    began = time.perf_counter()
    extra = ""
    if name == "ingest":
        result = read_examples(home / "pool.jsonl")
        info = store.datasets.register("pool", result.examples)
        extra = f"{info.rows} examples"
    else:
        uids = store.datasets.read("pool", columns=["uid"])["uid"]
        pool = store.datasets.read("pool", columns=["uid", "output"]) if name.startswith("write") else None
        began = time.perf_counter()  # time the signal work, not the dataset read
        flt = Signal("bench_len", {"n": n})
        vec = Signal("bench_vec", {"n": n, "d": 384}, kind="vector")
        if name == "write_float":
            r = store.signals.fill(flt, pool, lambda b: BatchResult.of(b["output"].str.len_chars().cast(float)),
                                   batch_size=100_000)
            extra = f"{r.computed} values in {r.batches} parts"
        elif name == "write_vector":
            rng = np.random.default_rng(0)

            def vectors(b):
                v = rng.standard_normal((b.height, 384), dtype=np.float32)
                return BatchResult.of(list(v / np.linalg.norm(v, axis=1, keepdims=True)))

            r = store.signals.fill(vec, pool, vectors, batch_size=50_000)
            extra = f"{r.computed} vectors in {r.batches} parts"
        elif name == "read_float":
            values = store.signals.values(flt, uids)
            extra = f"{values.height} values, {values['bench_len'].null_count()} missing"
        elif name == "read_vector":
            matrix, present = store.signals.matrix(vec, uids)
            extra = f"matrix {matrix.shape} {matrix.dtype}, {int(present.sum())} present"
    seconds = time.perf_counter() - began
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return {"step": name, "seconds": round(seconds, 2), "peak_rss_gb": round(rss_gb, 2), "note": extra}


def make_pool(path: Path, n: int) -> None:
    topics = ["math", "poetry", "history", "code", "biology", "travel", "cooking", "law"]
    with path.open("w") as f:
        for i in range(n):
            t = topics[i % len(topics)]
            f.write(json.dumps({"instruction": f"Explain {t} idea number {i}.", "input": "" if i % 3 else f"ctx {i}",
                                "output": f"Idea {i} in {t}: " + "detail " * (i % 40 + 5)}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--step", choices=STEPS)
    parser.add_argument("--home", type=Path)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(step(args.step, args.home, args.n)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        began = time.perf_counter()
        make_pool(home / "pool.jsonl", args.n)
        size = (home / "pool.jsonl").stat().st_size / 1024**2
        print(f"synthetic pool: {args.n:,} examples, {size:.0f} MB JSONL, written in {time.perf_counter() - began:.1f} s")
        print(f"{'step':<14}{'seconds':>9}{'peak RSS GB':>13}  note")
        rows = []
        for name in STEPS:
            out = subprocess.run([sys.executable, __file__, "--step", name, "--home", str(home), "--n", str(args.n)],
                                 capture_output=True, text=True, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            print(f"{row['step']:<14}{row['seconds']:>9}{row['peak_rss_gb']:>13}  {row['note']}")
        worst = max(r["peak_rss_gb"] for r in rows)
        read = next(r["seconds"] for r in rows if r["step"] == "read_float")
        print(f"\npeak RSS (worst step) {worst} GB vs target 3 GB: {'OK' if worst < 3 else 'MISSED'}")
        print(f"read one score column for {args.n:,} uids: {read} s vs target 1 s: {'OK' if read < 1 else 'MISSED'}")


if __name__ == "__main__":
    main()
