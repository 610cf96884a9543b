"""A toy pool of 24 examples in two kinds (repeat a fruit word, describe a fruit) for the flows that
fine-tune a tiny model on several subsets (DiverseEvol, InstructionGPT-4)."""

from __future__ import annotations

import polars as pl
from tiny_lm import WORDS

from sft_select.storage import make_example
from sft_select.storage.examples import frame


def fruit_pool() -> pl.DataFrame:
    rows = []
    for w in WORDS:
        rows.append(make_example([{"role": "user", "content": f"Repeat the word {w} three times."},
                                  {"role": "assistant", "content": f"Sure: {w}, {w}, {w}."}]))
        rows.append(make_example([{"role": "user", "content": f"Write a short line about the {w}."},
                                  {"role": "assistant", "content": f"The {w} is sweet and I eat a {w} daily."}]))
    return frame(rows)
