"""A separate process that computes one derived result and is killed between writing its file and
indexing it in the catalog (for the kill test).

usage: python derived_worker.py HOME CALLS_FILE [hang]
Each call of the compute function appends a line to CALLS_FILE. With ``hang``, the catalog insert
that follows the write never happens: the worker prints "written" and waits to be killed.
"""

import sys
import time

import polars as pl

from sft_select.storage import Store


def main() -> None:
    home, calls, hang = sys.argv[1], sys.argv[2], sys.argv[3:] == ["hang"]
    store = Store(home, lock_timeout_s=60)
    if hang:
        def stuck(*args, **kwargs):
            print("written", flush=True)
            time.sleep(600)

        store.derived._index = stuck

    def compute() -> pl.DataFrame:
        with open(calls, "a") as f:
            f.write("computed\n")
        return pl.DataFrame({"uid": ["a", "b", "c"], "cluster": [0, 1, 0]})

    found = store.derived.get_or_compute("toy", {"dataset": "fp-1", "k": 2}, compute)
    print("reused" if found.reused else "computed", found.rows, flush=True)


if __name__ == "__main__":
    main()
