"""The default reward model: what training it costs, and how often it ranks the preferred answer of
held-out preference pairs above the rejected one.

1. Train (or find in the model cache) the reward model of ``--pairs`` (default: the file shipped in
   ``flows/data/reward_pairs.jsonl``) from ``--base`` with the default ``RewardRecipe``; print its
   steps, training loss and wall time.
2. For each ``--eval`` preference file (any form ``tasks/reward.read_pairs`` reads, e.g.
   ``../shared/data/pref/dpo_en_demo_300.json`` and ``hh_rlhf_harmless_test.jsonl.gz``), the first
   ``--limit`` pairs, each (prompt, answer) cut at ``--max-length`` tokens: accuracy (chosen scored
   strictly above rejected), ties, mean margin, a one-sided binomial p-value against chance (0.5)
   and the scoring time. Target: accuracy above 0.5 with p < 0.05.

    python benchmarks/reward_model.py --eval ../shared/data/pref/dpo_en_demo_300.json \\
        --eval ../shared/data/pref/hh_rlhf_harmless_test.jsonl.gz [--limit 100] [--max-length 256]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from sft_select.tasks.reward import (DEFAULT_BASE, DEFAULT_PAIRS, RewardRecipe, preference_accuracy, read_pairs,
                                     train_reward_model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=Path, default=DEFAULT_PAIRS)
    ap.add_argument("--base", default=DEFAULT_BASE)
    ap.add_argument("--eval", type=Path, action="append", default=[])
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args()
    from scipy.stats import binomtest

    began = time.perf_counter()
    model = train_reward_model(args.pairs, args.base, RewardRecipe())
    print(f"reward model {model.identity}: {model.pairs} pairs of {model.pairs_file}, {model.steps} steps, "
          f"train loss {model.train_loss}, last logged train accuracy {model.train_accuracy}, "
          f"trained in {model.runtime_s:.0f} s on {model.device} (this call {time.perf_counter() - began:.0f} s)")
    for path in args.eval:
        pairs = read_pairs(path)[: args.limit]
        r = preference_accuracy(model.identity, pairs, max_length=args.max_length)
        correct = round(r["accuracy"] * len(pairs))
        p = binomtest(correct, len(pairs), 0.5, alternative="greater").pvalue
        print(f"{path.name}: {len(pairs)} pairs, accuracy {r['accuracy']:.3f} ({correct} of {len(pairs)}), "
              f"ties {r['ties']:.0f}, mean margin {r['mean_margin']:.3f}, binomial p {p:.3g}, "
              f"scored in {r['seconds']:.0f} s ({2 * len(pairs) / max(r['seconds'], 1e-9):.2f} answers/s)")


if __name__ == "__main__":
    main()
