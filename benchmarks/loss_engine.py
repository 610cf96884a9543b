"""The loss engine against a straightforward per-example loop, side by side on the same examples.

Both compute, for every example, the conditioned and the unconditioned answer loss (IFD's s(A|Q)
and s(A)) with SmolLM2-135M-Instruct and its chat template:

- loop: two forward passes per example (prompt + answer, then the bare answer header + answer),
  one sequence at a time, the model's own ``labels=`` loss with the prompt masked;
- engine: ``example_losses`` twice (conditioned, unconditioned), length-sorted batches under a
  token budget, logits only from the answer on.

Target: at least 5x the loop's tokens per second, values equal to 1e-4 (float32 both sides). A
last row shows the engine under bf16 autocast for reference (its values are not float32's), where this CPU runs bf16 fast.

    python benchmarks/loss_engine.py [--examples 64] [--token-budget 8192] [--threads N] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from sft_select.storage import read_examples
from sft_select.tasks.backends import loss_engine as lm
from sft_select.tasks.backends.models import load_causal_lm
from sft_select.tasks.backends.precision import bf16_is_fast

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "train" / "alpaca_9k.json"


def loop_losses(model, tokenizer, rows) -> np.ndarray:
    """Per example: tokenise context and context + answer, mask the context, one forward pass each."""
    header = lm.chat_answer_header(tokenizer)
    out = []
    with torch.no_grad():
        for row in rows:
            context, answer = lm.render(row, tokenizer, "chat")
            pair = []
            for ctx in (context, header):
                n_ctx = len(tokenizer(ctx, add_special_tokens=False)["input_ids"])
                ids = tokenizer(ctx + answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
                labels = ids.clone()
                labels[:, :n_ctx] = -100
                pair.append(model(input_ids=ids, labels=labels).loss.item())
            out.append(pair)
    return np.asarray(out)


def engine_losses(model, tokenizer, rows, token_budget: int, bf16: bool = False) -> tuple[np.ndarray, int]:
    both = [lm.example_losses(model, tokenizer, rows, conditioned=c, template="chat", max_length=4096,
                              token_budget=token_budget, bf16=bf16) for c in (True, False)]
    tokens = sum(r.context_tokens + r.answer_tokens for results in both for r in results)
    return np.asarray([[a.loss, b.loss] for a, b in zip(*both)], dtype=float), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--token-budget", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating; the best counts")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 reference row")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not DATA.exists():
        raise SystemExit(f"needs the shared data ({DATA.name} under ../shared/data/train)")
    rows = read_examples(DATA, on_error="skip").examples.head(args.examples).to_dicts()
    model, tokenizer = load_causal_lm("smollm2-135m-instruct")
    engine_losses(model, tokenizer, rows[:2], args.token_budget)  # warm-up

    engine_s = loop_s = float("inf")
    for _ in range(args.repeats):  # alternate, keep each one's best: a shared machine's noise hits both
        began = time.perf_counter()
        ours, tokens = engine_losses(model, tokenizer, rows, args.token_budget)
        engine_s = min(engine_s, time.perf_counter() - began)
        began = time.perf_counter()
        theirs = loop_losses(model, tokenizer, rows)
        loop_s = min(loop_s, time.perf_counter() - began)

    print(f"answer losses, conditioned + unconditioned, of {len(rows)} Alpaca examples ({tokens} tokens), "
          f"SmolLM2-135M-Instruct, {torch.get_num_threads()} torch threads, {model.device}")
    print(f"{'implementation':<34}{'seconds':>9}{'tokens/s':>10}{'max |diff|':>12}")
    print(f"{'per-example loop (float32)':<34}{loop_s:>9.1f}{tokens / loop_s:>10.0f}{'':>12}")
    print(f"{'engine (float32)':<34}{engine_s:>9.1f}{tokens / engine_s:>10.0f}{np.abs(ours - theirs).max():>12.2e}")
    if not args.no_bf16 and not bf16_is_fast("cpu"):
        print("(bf16 reference row skipped: the probe finds bf16 slower than float32 on this CPU)")
    elif not args.no_bf16:
        began = time.perf_counter()
        half, _ = engine_losses(model, tokenizer, rows, args.token_budget, bf16=True)
        half_s = time.perf_counter() - began
        print(f"{'engine (bf16 autocast, reference)':<34}{half_s:>9.1f}{tokens / half_s:>10.0f}"
              f"{np.abs(half - theirs).max():>12.2e}")
    ok = np.abs(ours - theirs).max() <= 1e-4
    print(f"speed-up {loop_s / engine_s:.1f}x at float32 (target >= 5x); values equal to 1e-4: {'yes' if ok else 'NO'}")


if __name__ == "__main__":
    main()
