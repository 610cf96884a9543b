"""A separate process that fills a signal slowly (for the kill and concurrency tests).

usage: python signal_worker.py HOME SIGNAL_NAME N BATCH SLEEP_S CALLS_FILE
Every uid the compute function sees is appended to CALLS_FILE, so the test can count model calls.
"""

import sys
import time

from sft_select.storage import BatchResult, Signal, Store
from sft_select.storage.examples import frame, make_example


def main() -> None:
    home, name, n, batch, sleep_s, calls = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
        float(sys.argv[5]), sys.argv[6]
    store = Store(home, lock_timeout_s=60)
    examples = frame([make_example([{"role": "user", "content": f"question {i}"},
                                    {"role": "assistant", "content": "answer " * (i % 7 + 1)}]) for i in range(n)])

    def compute(b):
        with open(calls, "a") as f:
            f.write("".join(u + "\n" for u in b["uid"]))
        time.sleep(sleep_s)
        return BatchResult.of([float(len(o)) for o in b["output"]], calls=b.height)

    report = store.signals.fill(Signal(name, {"n": n}), examples, compute, batch_size=batch)
    print(report.computed, report.reused, flush=True)


if __name__ == "__main__":
    main()
