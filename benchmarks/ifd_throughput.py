"""IFD throughput: examples per second of the IFD pipeline over alpaca_9k with SmolLM2-135M-Instruct,
and the share of its wall time spent inside the model's forward pass (target: over 80%, i.e. the
rest of the pipeline is not the bottleneck).

What is timed is what the ``ifd`` flow does for its scores (without pre-experience, whose cost is a
fine-tune): both ``lm_loss`` signals (conditioned and unconditioned) filled through the signal
store (``fill_signal``: the missing-uid anti-join, length-sorted batches, tokenising, the forward
passes, the loss reduction, one durable Parquet part per batch, the catalog), then the IFD table
read back from the store. The forward share is measured by hooks around every call of the model's
decoder and output layer (the loss engine calls these two, not the top-level ``forward``). The store is a fresh temporary one, so everything is computed; the model is loaded
(and converted from GGUF once, into the usual model cache) before the clock starts.

    python benchmarks/ifd_throughput.py [--limit N] [--variant cherry|superfiltering]
                                        [--precision float32|bfloat16] [--batch-size 64] [--threads N]

Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "train" / "alpaca_9k.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="the first N examples (default: all 9,229)")
    ap.add_argument("--variant", choices=["cherry", "superfiltering"], default="cherry")
    ap.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--batch-size", type=int, default=64, help="examples per durable batch (the flow's default)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if not DATA.exists():
        raise SystemExit(f"needs the shared data ({DATA.name} under ../shared/data/train)")

    # a temporary store, but the usual model cache (so the GGUF conversion happens at most once)
    import platformdirs

    home = Path(os.environ.get("SFT_SELECT_HOME") or platformdirs.user_data_dir("sft-select")).expanduser()
    os.environ.setdefault("SFT_SELECT_MODEL_CACHE", str(home / "models"))
    os.environ["SFT_SELECT_HOME"] = store = tempfile.mkdtemp(prefix="ifd-throughput-")
    try:
        run(args)
    finally:
        shutil.rmtree(store, ignore_errors=True)


def run(args: argparse.Namespace) -> None:
    """Fill both loss signals for the examples in the (temporary) store and print the timings."""
    import torch

    from sft_select.flows.ifd import MAX_LENGTH, TEMPLATE, ifd_table
    from sft_select.storage import read_examples
    from sft_select.tasks.backends.loss_engine import example_losses
    from sft_select.tasks.backends.models import load_causal_lm
    from sft_select.tasks.signal_task import DatasetRef, fill_signal, get_store
    from sft_select.tasks.lm_loss import build_lm_loss, by_length, lm_loss_signal

    if args.threads:
        torch.set_num_threads(args.threads)
    examples = read_examples(DATA, on_error="skip").examples
    examples = examples.head(args.limit) if args.limit else examples
    dataset = DatasetRef.of(get_store().datasets.register("alpaca-bench", examples))

    name = "smollm2-135m-instruct"
    model, tokenizer = load_causal_lm(name)
    template, max_length = TEMPLATE[args.variant], MAX_LENGTH[args.variant]
    example_losses(model, tokenizer, examples.head(8).to_dicts(), template=template, max_length=max_length,
                   bf16=args.precision == "bfloat16")  # warm-up, outside the clock

    forward = {"seconds": 0.0, "calls": 0, "began": 0.0}
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)

    def before(module, inputs):
        sync()
        forward["began"] = time.perf_counter()

    def after(module, inputs, output):
        sync()
        forward["seconds"] += time.perf_counter() - forward["began"]
        forward["calls"] += 1

    # The loss engine runs the decoder and then the output layer on the answer positions only, so
    # the model's forward is the time inside those two modules (the top-level forward is not called).
    parts = [model.get_decoder(), model.get_output_embeddings()]
    hooks = [h for m in parts for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    signals = [lm_loss_signal(name, conditioned=c, template=template, max_length=max_length,
                              precision=args.precision) for c in (True, False)]
    began = time.perf_counter()
    refs = [fill_signal(s, dataset, build_lm_loss, batch_size=args.batch_size, order_by=by_length) for s in signals]
    table = ifd_table(*signals, examples["uid"].to_list(), ratio="loss" if args.variant == "cherry" else "perplexity")
    wall = time.perf_counter() - began
    for h in hooks:
        h.remove()

    tokens = sum(r.usage.get("prompt_tokens", 0.0) for r in refs)
    n = examples.height
    print(f"IFD ({args.variant}: template {template}, max_length {max_length}, {args.precision}) of {n} alpaca_9k "
          f"examples, {name}, {torch.get_num_threads()} torch threads, {model.device}")
    print(f"{'examples/s':>12}{'tokens/s':>10}{'wall s':>9}{'forward s':>11}{'forward calls':>15}{'forward share':>15}")
    print(f"{n / wall:>12.2f}{tokens / wall:>10.0f}{wall:>9.1f}{forward['seconds']:>11.1f}{forward['calls']:>15}"
          f"{100 * forward['seconds'] / wall:>14.1f}%")
    print(f"two losses per example, {int(tokens)} tokens scored, {2 * -(-n // args.batch_size)} durable batches; "
          f"IFD < 1 for {table.filter(table['ifd'] < 1).height} of {n}; target: forward share > 80%")

if __name__ == "__main__":
    main()
