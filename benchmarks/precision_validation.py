"""Is a lower precision faithful? IFD and the local judge's ratings at int8 (or bf16) against float32.

A lower precision may become the CPU default only if it selects what float32 selects. On the first
``--limit`` examples of alpaca_9k (1,000 by default), through the configured store (so every signal
is cached, a cut-off run resumes, and the float32 losses are the ones the ``ifd`` flow reuses):

1. IFD: both ``lm_loss`` signals of the variant (superfiltering: SmolLM2 itself, no template,
   perplexity ratio; cherry: the base model with the Alpaca prompt, loss ratio, without the
   pre-experience fine-tune) at float32 and at ``--precision``;
2. the local judge (``--judge N`` examples, 0 skips it): AlpaGasus's expected accuracy rating by
   ``local`` and by ``local@<precision>``.

Printed for each: Spearman's rank correlation with float32 and the overlap of the top 10% (the
share of float32's top 10% that the lower precision also puts in its top 10%); pass: Spearman >= 0.99
and overlap >= 0.9. The wall time of each fill and the examples it computed (0 when the store already
had them) give the speed of each precision measured in the same run.

    python benchmarks/precision_validation.py [--limit 1000] [--precision int8] [--variant superfiltering]
                                              [--judge 1000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import polars as pl

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "train" / "alpaca_9k.json"
SPEARMAN, OVERLAP = 0.99, 0.9


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = pl.Series(a).rank("average").to_numpy()
    rb = pl.Series(b).rank("average").to_numpy()
    return float(np.corrcoef(ra, rb)[0, 1])


def top_overlap(a: np.ndarray, b: np.ndarray, share: float = 0.1, largest: bool = True) -> float:
    """Share of ``a``'s top ``share`` that is also in ``b``'s."""
    k = max(1, round(share * len(a)))
    order = (lambda x: np.argsort(-x, kind="stable")) if largest else (lambda x: np.argsort(x, kind="stable"))
    return len(set(order(a)[:k]) & set(order(b)[:k])) / k


def compare(name: str, reference: pl.DataFrame, lower: pl.DataFrame, *, largest: bool) -> bool:
    both = reference.join(lower, on="uid", suffix="_low").drop_nulls().drop_nans()
    a, b = both["v"].to_numpy(), both["v_low"].to_numpy()
    rho, overlap = spearman(a, b), top_overlap(a, b, largest=largest)
    ok = rho >= SPEARMAN and overlap >= OVERLAP
    print(f"{name:<52}{both.height:>6}{rho:>10.4f}{overlap:>10.3f}   {'pass' if ok else 'FAIL'}")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--precision", choices=["int8", "bfloat16"], default="int8")
    ap.add_argument("--variant", choices=["superfiltering", "cherry"], default="superfiltering")
    ap.add_argument("--judge", type=int, default=1000, help="examples the local judge rates at both precisions")
    args = ap.parse_args()
    if not DATA.exists():
        raise SystemExit(f"needs the shared data ({DATA.name} under ../shared/data/train)")

    import torch

    from sft_select.flows.ifd import MAX_LENGTH, TEMPLATE, ifd_table
    from sft_select.storage import read_examples
    from sft_select.tasks.backends.chat import get_llm
    from sft_select.tasks.judge import llm_signal, llm_batch_of
    from sft_select.tasks.lm_loss import build_lm_loss, by_length, lm_loss_signal
    from sft_select.tasks.prompts import ALPAGASUS
    from sft_select.tasks.signal_task import DatasetRef, fill_signal, get_store

    examples = read_examples(DATA, on_error="skip", limit=args.limit).examples
    dataset = DatasetRef.of(get_store().datasets.register(f"alpaca_9k_head{args.limit}", examples))
    uids = examples["uid"].to_list()
    model, template, max_length = "smollm2-135m-instruct", TEMPLATE[args.variant], MAX_LENGTH[args.variant]
    print(f"{examples.height} alpaca_9k examples, {model}, {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} torch threads; store {get_store().home.name}")

    def timed(label: str, signal, build, data: DatasetRef, batch_size: int, order_by=None) -> None:
        began = time.perf_counter()
        ref = fill_signal(signal, data, build, batch_size=batch_size, order_by=order_by)
        seconds = time.perf_counter() - began
        rate = f"{ref.computed / seconds:.2f} examples/s" if ref.computed else "cached"
        print(f"  {label}: {ref.computed} computed, {ref.reused} reused, {seconds:.0f} s ({rate})", flush=True)

    scores = {}
    for precision in ("float32", args.precision):
        signals = [lm_loss_signal(model, conditioned=c, template=template, max_length=max_length,
                                  precision=precision) for c in (True, False)]
        for s in signals:
            timed(f"lm_loss {precision} conditioned={s.params['conditioned']}", s, build_lm_loss, dataset, 64,
                  by_length)
        table = ifd_table(*signals, uids, ratio="loss" if args.variant == "cherry" else "perplexity")
        scores[precision] = table.select("uid", v="ifd")

    results = []
    print(f"{'what':<52}{'n':>6}{'spearman':>10}{'top 10%':>10}")
    # both IFD variants keep the highest scores (below 1)
    results.append(compare(f"IFD ({args.variant}), {args.precision} vs float32", scores["float32"],
                           scores[args.precision], largest=True))

    if args.judge:
        rated = {}
        head = DatasetRef.of(get_store().datasets.register(f"alpaca_9k_head{args.judge}",
                                                           examples.head(args.judge)))
        for spec in ("local", f"local@{args.precision}"):
            signal = llm_signal(ALPAGASUS["accuracy", "expected"], get_llm(spec))
            timed(f"judge {spec}", signal, llm_batch_of, head, 32)
            rated[spec] = get_store().signals.values(signal, head.read(["uid"])["uid"], alias="v")
        results.append(compare(f"local judge (AlpaGasus expected), {args.precision} vs float32",
                               rated["local"], rated[f"local@{args.precision}"], largest=True))
    print(f"pass: Spearman >= {SPEARMAN} and top-10% overlap >= {OVERLAP}; "
          f"{args.precision} {'passes' if all(results) else 'does not pass'}")


if __name__ == "__main__":
    main()
