"""Peak memory of reading a file that holds one huge record, refused (over --max-record-chars) or
accepted (the limit raised above it), in .jsonl and in .json.

    python benchmarks/record_memory.py [--mb 50]

Each read runs in a fresh process; the figure is that process's peak RSS (VmHWM) minus the peak
of the same process reading a one-record file, so imports do not count. Target: the extra memory of
a refused record stays near the limit, not the record (< 0.2x the file), and an accepted one within
6x the file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec, and the
# parent here has just written the big file.
CHILD = """
import re, sys
from pathlib import Path
from sft_select.storage import read_examples
r = read_examples(sys.argv[1], on_error="skip", max_record_chars=int(sys.argv[2]))
hwm = re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)
print(hwm, r.examples.height, len(r.rejected))
"""


def peak_mb(path: Path, limit: int) -> tuple[float, int, int]:
    """Peak RSS in MB of a fresh process reading ``path``, and the examples kept and rejected."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(limit)], capture_output=True, text=True,
                         check=True).stdout.split()
    return int(out[0]) / 1024, int(out[1]), int(out[2])


def write(folder: Path, suffix: str, records: list[dict]) -> Path:
    path = folder / f"big{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=50, help="size of the huge record's output, in MB")
    args = parser.parse_args()
    small = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    huge = {"instruction": "Repeat.", "input": "", "output": "word " * (args.mb * 1_000_000 // 5)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print(f"{'file':<7} {'record':<9} {'file MB':>8} {'peak MB':>8} {'extra MB':>9} {'x file':>7}  kept/rejected")
        for suffix in (".jsonl", ".json"):
            base, _, _ = peak_mb(write(folder, suffix, [small]), 1_000_000)
            path = write(folder, suffix, [huge, small])
            size = path.stat().st_size / 1e6
            for label, limit in (("refused", 1_000_000), ("accepted", 2 * args.mb * 1_000_000)):
                peak, kept, rejected = peak_mb(path, limit)
                print(f"{suffix:<7} {label:<9} {size:>8.1f} {peak:>8.0f} {peak - base:>9.0f} "
                      f"{(peak - base) / size:>7.2f}  {kept}/{rejected}")


if __name__ == "__main__":
    main()
