"""Indicators of an example's quality, and the experiment that turns a subset into a quality label.

Shared by the indicator-based methods: InstructMining (Cao et al. 2023, "Instruction Mining: When Data
Mining Meets Large Language Model Finetuning") and InstructionGPT-4 (Wei et al. 2023,
"InstructionGPT-4: A 200-Instruction Paradigm for Fine-Tuning MiniGPT-4").

Cheap indicators are computed on the fly from the examples (they cost less than reading a signal):

- lengths: words in the prompt (instruction and input, every turn before the last answer) and in the
  answer, with the word tokenizer of :func:`words`;
- **MTLD** (McCarthy & Jarvis 2010, "MTLD, vocd-D, and HD-D"): walk the answer's words keeping the
  running type-token ratio ``TTR = types / tokens`` of the current segment; when it falls to the
  threshold (0.72) one *factor* is complete and a new segment starts. The remainder adds the partial
  factor ``(1 - TTR_rest) / (1 - 0.72)``. ``MTLD = tokens / factors``, averaged over a forward and a
  backward pass. A text whose TTR never leaves 1 (no word repeats) has no factor at all; it counts
  as one factor, so its MTLD is its word count (the convention of the ``lexicalrichness`` package).
  An empty text has no MTLD (NaN).
- **KNN-i** (InstructMining): the mean euclidean distance from an example's embedding to its ``i``
  nearest other examples of the pool, ``knn_i(x) = (1/i) * sum_{j in NN_i(x)} ||x - x_j||``. It
  depends on the pool, so it is computed from the stored ``embed`` signal, never stored itself.

Judge-scored indicators are LLM signals (:data:`~sft_select.tasks.prompts.INDICATORS`, filled with
:data:`~sft_select.tasks.judge.score_with_llm`): ``quality`` (0-100, InstructionGPT-4's GPT-4 score;
InstructMining's reward-model slot where no reward model is configured) and UniEval's dialogue
dimensions ``naturalness``, ``coherence``, ``understandability`` (Zhong et al. 2022), asked of a
judge on a 1-5 scale instead of UniEval's yes-probability. The wording is ours.

Quality labels (:func:`subset_quality`): fine-tune the base model on a subset with one recipe
(:func:`~sft_select.tasks.finetune.finetune_task`; :data:`LABEL_RECIPE`, one epoch at 512 tokens, by
default, since a method fine-tunes one model per subset) and measure the model's mean answer loss on
held-out reference answers (:class:`~sft_select.tasks.evaluate.ReferenceLoss`). Both steps are cached
on content, so a re-run trains and evaluates nothing it has done before. When no evaluation file is
given, :func:`heldout_suite` holds out a seeded random part of the pool and writes it under the
store's home (its content, not its path, keys the evaluation).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl
from pydantic import BaseModel, Field

from sft_select.storage import SCHEMA, fingerprint
from sft_select.storage.examples import prompt_text
from sft_select.tasks.signal_task import get_store
from sft_select.tasks.evaluate import ReferenceLoss, tune_and_evaluate
from sft_select.tasks.finetune import Recipe

log = logging.getLogger("sft_select")

MTLD_THRESHOLD = 0.72
_WORD = re.compile(r"\w+(?:'\w+)*")


# -- cheap indicators ------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """Lower-cased words: runs of letters and digits, inner apostrophes kept ("don't" is one word)."""
    return _WORD.findall(text.lower())


def _mtld_pass(tokens: Iterable[str], threshold: float) -> float:
    """Factors of one pass (complete ones plus the partial factor of the remainder)."""
    factors, types, count, ttr = 0.0, set(), 0, 1.0
    for token in tokens:
        count += 1
        types.add(token)
        ttr = len(types) / count
        if ttr <= threshold:
            factors += 1
            types, count, ttr = set(), 0, 1.0
    if count:
        factors += (1 - ttr) / (1 - threshold)
    return factors


def mtld(text: str | Sequence[str], threshold: float = MTLD_THRESHOLD) -> float:
    """MTLD of a text (or of its words), the mean of a forward and a backward pass; NaN when empty."""
    tokens = words(text) if isinstance(text, str) else list(text)
    if not tokens:
        return math.nan
    values = []
    for seq in (tokens, tokens[::-1]):
        factors = _mtld_pass(seq, threshold)
        values.append(len(tokens) / (factors if factors > 0 else 1.0))
    return sum(values) / 2


def text_indicators(examples: pl.DataFrame) -> pl.DataFrame:
    """``uid, input_length, output_length, mtld`` (lengths in words; MTLD of the answer)."""
    prompts = [prompt_text({"messages": m}) for m in examples["messages"].to_list()]
    outputs = examples["output"].to_list()
    return pl.DataFrame({
        "uid": examples["uid"],
        "input_length": [float(len(words(p))) for p in prompts],
        "output_length": [float(len(words(o))) for o in outputs],
        "mtld": [mtld(o) for o in outputs],
    }).with_columns(pl.col("mtld").fill_nan(None))


def knn_distance(vectors: np.ndarray, k: int = 6) -> np.ndarray:
    """KNN-k: for each row, the mean euclidean distance to its ``k`` nearest other rows (exact
    search, faiss). A row's own match is left out even where an exact duplicate shares its place."""
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"KNN-{k} needs more than {k} vectors, got {n}")
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    d2, found = index.search(x, k + 1)
    own = found == np.arange(n)[:, None]
    # drop each row's own match; where search did not return it (ties with duplicates), drop the farthest
    keep = ~own
    keep[~own.any(axis=1), -1] = False
    d2 = d2[keep].reshape(n, k)
    return np.sqrt(np.maximum(d2, 0.0)).mean(axis=1)


# -- quality labels: fine-tune on a subset, measure the model ---------------------------------------------


# Labelling experiments fine-tune one model per subset: one pass at 512 tokens keeps K of them affordable.
LABEL_RECIPE = Recipe(epochs=1.0, max_length=512)


class LabelSettings(BaseModel):
    """How a subset's quality is measured: the parameters of the methods that learn from fine-tuned
    subsets (InstructMining, InstructionGPT-4), shown in their Prefect forms."""

    base: str = Field("smollm2-135m-instruct", description="Model fine-tuned on every subset.")
    recipe: Recipe = Field(LABEL_RECIPE, description="Fine-tuning recipe of every subset (default: one epoch, "
                                                     "512 tokens).")
    heldout: int = Field(100, ge=1, description="Pool examples held out as reference answers (without eval_file), "
                                                "at most a fifth of the pool; they are never selected.")
    eval_file: str | None = Field(None, description="File of held-out reference answers (any readable format); "
                                                    "empty: hold out examples of the pool.")


class SubsetQuality(BaseModel):
    """What a model fine-tuned on one subset scored on the held-out reference answers."""

    name: str
    examples: int
    fingerprint: str
    model: str
    loss: float
    train_loss: float | None = None


def heldout_split(pool: pl.DataFrame, n: int, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(the rest, ``n`` examples held out), drawn with ``seed`` from the pool in uid order."""
    if not 0 < n < pool.height:
        raise ValueError(f"cannot hold out {n} of {pool.height} examples")
    ordered = pool.sort("uid")
    held = np.zeros(ordered.height, dtype=bool)
    held[np.random.default_rng(seed).choice(ordered.height, n, replace=False)] = True
    mask = pl.Series(held)
    return ordered.filter(~mask), ordered.filter(mask)


def heldout_suite(heldout: pl.DataFrame, max_length: int = 1024) -> ReferenceLoss:
    """A reference-loss suite over ``heldout``: its examples (canonical Parquet, uid order) written
    once as a derived result keyed on their fingerprint."""
    found = get_store().derived.get_or_compute("heldout", {"examples": fingerprint(heldout["uid"])},
                                               lambda: heldout.sort("uid").select(list(SCHEMA)))
    return ReferenceLoss(path=found.path, max_length=max_length)


def reference_suite(pool: pl.DataFrame, eval_file: str | None, heldout: int,
                    seed: int = 0) -> tuple[ReferenceLoss, set[str]]:
    """The reference answers that measure a subset's model: ``eval_file`` when given (nothing held
    out), else ``heldout`` examples of the pool, at most a fifth of it (:func:`heldout_split`,
    :func:`heldout_suite`). Returns the suite and the uids held out, which a method must neither
    train on nor select."""
    if eval_file:
        return ReferenceLoss(path=Path(eval_file)), set()
    n = min(heldout, max(1, pool.height // 5))
    if n < heldout:
        log.warning("holding out %d examples (a fifth of the pool), not %d", n, heldout)
    _, held = heldout_split(pool, n, seed)
    return heldout_suite(held), set(held["uid"])


def subset_quality(subsets: Mapping[str, pl.DataFrame], base: str, recipe: Recipe,
                   suite: ReferenceLoss) -> list[SubsetQuality]:
    """Fine-tune ``base`` on each subset and evaluate the model with ``suite``
    (:func:`~sft_select.tasks.evaluate.tune_and_evaluate`); one :class:`SubsetQuality` per subset, in
    the given order. Call it inside a flow: each fine-tune and evaluation is a cached Prefect task."""
    results = []
    for name, examples in subsets.items():
        tuned = tune_and_evaluate(examples, base, recipe, [suite], name=f"subset {name}")
        loss = tuned.evaluations[0].metrics["loss"]
        if not math.isfinite(loss):
            raise ValueError(f"subset {name}: the evaluation produced no loss ({tuned.evaluations[0].metrics})")
        results.append(SubsetQuality(name=name, examples=examples.height, fingerprint=fingerprint(examples["uid"]),
                                     model=tuned.model.key, loss=loss, train_loss=tuned.model.train_loss))
        log.info("subset %s (%d examples): held-out loss %.4f", name, examples.height, loss)
    return results


__all__ = ["LABEL_RECIPE", "MTLD_THRESHOLD", "LabelSettings", "SubsetQuality", "heldout_split",
           "heldout_suite", "knn_distance", "mtld", "reference_suite", "subset_quality", "text_indicators", "words"]
