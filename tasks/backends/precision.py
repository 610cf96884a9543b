"""Which precision this machine runs fast: decided by measuring, never assumed.

Machines of one kind differ: on an AVX2-only CPU (no AVX-512 BF16, no AMX) a bf16 matmul of
SmolLM2's layer shapes ran eighty times slower than float32, while another CPU of the same kind ran
bf16 autocast four times faster. :func:`bf16_is_fast` answers for the device at hand: on a GPU,
whether it supports bf16; on the CPU, a short probe (a matmul of a decoder layer's shape in each
precision, best of a few) measured once per machine and remembered in the model cache.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from functools import lru_cache

from sft_select.settings import settings

log = logging.getLogger("sft_select")

# rows x hidden @ hidden x intermediate of SmolLM2-135M: small enough to take milliseconds at float32
PROBE_SHAPE = (64, 576, 1536)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe_cpu(reps: int = 3) -> dict[str, float]:
    """GFLOP/s of the probe matmul in float32 and bfloat16 on this CPU (best of ``reps``)."""
    import torch

    m, k, n = PROBE_SHAPE
    rates = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b  # warm-up: kernel selection, allocation
        best = float("inf")
        for _ in range(reps):
            began = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - began)
        rates[name] = 2 * m * k * n / best / 1e9
    return rates


@lru_cache(maxsize=None)
def bf16_is_fast(device: str = "cpu") -> bool:
    """Whether bf16 is at least as fast as float32 here (then "auto" precision takes it)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    key = f"{_cpu_name()}|torch {torch.__version__}|threads {torch.get_num_threads()}"
    path = settings().model_cache / "cpu_precision.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    rates = known.get(key)
    if rates is None:
        rates = probe_cpu()
        known[key] = rates
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(known, indent=1))
        except OSError:  # a read-only cache: measure again next time
            pass
    fast = rates["bfloat16"] >= rates["float32"]
    log.info("precision on this CPU (%s): float32 %.1f GFLOP/s, bfloat16 %.1f GFLOP/s: %s is faster",
             torch.backends.cpu.get_cpu_capability(), rates["float32"], rates["bfloat16"],
             "bfloat16" if fast else "float32")
    return fast
