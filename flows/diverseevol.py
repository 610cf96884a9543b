"""DiverseEvol (Wu et al. 2023, "Self-Evolved Diverse Data Sampling for Efficient Instruction Tuning").

The model being tuned chooses its own training data, round by round::

    S_0 = n_0 examples drawn at random from the pool D
    for t = 1 .. T:
        M_t = fine-tune(base, S_{t-1})                        # from the base model every round
        e_i = mean over the tokens of M_t's last hidden states, for every i in D
        repeat per_round times (k-center greedy, Sener & Savarese 2018, euclidean):
            u = argmax_{i in D \\ S} min_{c in S} ||e_i - e_c||;   S = S + {u}
        S_t = S
    return S_T

Paper defaults: n_0 = 100, 100 per round, 10 rounds (1,100 examples); under 8% of the data matched
the full data. Here ``budget`` (a count or fraction), when set, fixes |S_T| instead: rounds run
until it is reached and the last round adds what is left (``rounds`` is then ignored).

Resuming: each finished round is a derived result (``<home>/derived/diverseevol-round/<key>.json``)
keyed on what the round depends on (the pool's and S_{t-1}'s fingerprints, the base model's
identity, the recipe, the embedding settings and the count to add), so a re-run, or a run that
was killed, skips finished rounds without loading a model and resumes at the first unfinished one.
Inside a round, the fine-tune is cached on (selection, base, recipe) and the pool's embeddings are
a signal of the fine-tuned model (filled batch by batch), so even a round cut short keeps its work.

Deviations: the paper fine-tunes LLaMA-7B fully for 3 epochs each round; here any base and
:class:`~sft_select.tasks.finetune.Recipe` (LoRA by default). Its code embeds the Alpaca-formatted
training text; here the example's plain text (prompt, a blank line, answer), truncated to
``max_tokens`` tokens. Each round trains on S_{t-1} in uid order. Examples whose embedding failed
are never picked.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl
from prefect import flow
from pydantic import BaseModel, Field

from sft_select.flows.common import MethodParams, SelectionRef, finish
from sft_select.storage import fingerprint
from sft_select.tasks.backends.models import model_identity
from sft_select.tasks.cluster import select_kcenter
from sft_select.tasks.embed import embed_finetuned, finetuned_embed_signal
from sft_select.tasks.finetune import Recipe, finetune_task
from sft_select.tasks.report import publish_table
from sft_select.tasks.select import resolve_budget
from sft_select.tasks.signal_task import DatasetRef, SignalRef, get_store

VERSION = "1"


class Round(BaseModel):
    """One finished round: the examples it added, in k-center order, with their distances to the
    selection before them, and the covering radius after it."""

    round: int
    key: str
    model: str = Field(description="content key of the model fine-tuned on the selection before the round")
    selected_before: int
    added: list[str]
    distances: list[float]
    radius: float
    reused: bool = False


def round_inputs(dataset: DatasetRef, selected: list[str], base: str, recipe: Recipe, max_tokens: int,
                 add: int) -> dict[str, Any]:
    """Everything a round's outcome depends on, as content."""
    return {"dataset": dataset.fingerprint, "selected": fingerprint(selected), "base": model_identity(base),
            "recipe": recipe.hash(), "max_tokens": max_tokens, "add": add}


def evolve_round(t: int, dataset: DatasetRef, pool: pl.DataFrame, selected: list[str], add: int, base: str,
                 recipe: Recipe, max_tokens: int) -> tuple[Round, SignalRef | None]:
    """Round t: fine-tune on the selection, embed the pool with that model, add ``add`` examples by
    k-center greedy from the selection (or read the finished round back from the derived store).
    Returns the round and the embedding signal it filled (None for a finished round read back)."""
    inputs = round_inputs(dataset, selected, base, recipe, max_tokens, add)
    embedded: SignalRef | None = None

    def compute() -> dict[str, Any]:
        nonlocal embedded
        training = pool.join(pl.DataFrame({"uid": selected}), on="uid", how="semi").sort("uid")
        model = finetune_task(training, base, recipe)
        signal = finetuned_embed_signal(model, max_tokens)
        embedded = embed_finetuned(signal, dataset)
        chosen = select_kcenter(signal, dataset, len(selected) + add, seed_uids=selected)
        picks = list(zip(chosen.uids[chosen.seeds:], chosen.distances[chosen.seeds:]))[:add]
        return {"round": t, "model": model.key, "selected_before": len(selected), "added": [u for u, _ in picks],
                "distances": [float(d) for _, d in picks], "radius": chosen.radius}

    found = get_store().derived.get_or_compute("diverseevol-round", inputs, compute, version=VERSION, fmt="json")
    return Round(key=found.key, reused=found.reused, **found.read()), embedded


class DiverseEvolParams(MethodParams):
    budget: float | None = Field(None, description="Size of the final selection: a count (>= 1) or a fraction "
                                                   "(< 1); empty: initial + rounds x per_round (the paper's 1,100).")
    initial: int = Field(100, ge=1, description="n_0: examples drawn at random to start from.")
    per_round: int = Field(100, ge=1, description="Examples added by k-center greedy in each round.")
    rounds: int = Field(10, ge=0, description="Rounds T when no budget is set.")
    base: str = Field("smollm2-135m-instruct", description="Model fine-tuned every round (embedded name, folder "
                                                           "or hub id).")
    recipe: Recipe = Field(default_factory=Recipe, description="Fine-tuning recipe of every round.")
    max_tokens: int = Field(512, ge=8, description="Texts are truncated to this many tokens before embedding.")


@flow(name="diverseevol", log_prints=True)
def diverseevol(params: DiverseEvolParams) -> SelectionRef:
    """Start from random examples; each round fine-tune, re-embed the pool with the new model and
    grow the selection by k-center greedy."""
    dataset = DatasetRef.load(params.dataset, params.dataset_version)
    pool = dataset.read().sort("uid")  # content order, so the draw depends on content, not file order
    total = (resolve_budget(params.budget, dataset.rows) if params.budget is not None
             else min(params.initial + params.rounds * params.per_round, dataset.rows))
    start = min(params.initial, total)
    rng = np.random.default_rng(params.seed)
    selected: list[str] = [pool["uid"][int(i)] for i in rng.choice(pool.height, start, replace=False)]
    rows = [{"uid": u, "score": None, "reason": f"initial random draw {i + 1} (seed {params.seed})"}
            for i, u in enumerate(selected)]

    signals: list[SignalRef] = []
    done: list[Round] = []
    for t in range(1, math.ceil((total - start) / params.per_round) + 1):
        r, embedded = evolve_round(t, dataset, pool, selected, min(params.per_round, total - len(selected)),
                                   params.base, params.recipe, params.max_tokens)
        signals += [embedded] if embedded else []
        if not r.added:  # nothing left that has an embedding
            break
        rows += [{"uid": u, "score": d, "reason": f"round {t}: k-center pick {j + 1}, {d:.4f} from the selection"}
                 for j, (u, d) in enumerate(zip(r.added, r.distances))]
        selected += r.added
        done.append(r)
        print(f"diverseevol: round {t} {'reused' if r.reused else 'done'}: +{len(r.added)} -> {len(selected)} "
              f"examples, covering radius {r.radius:.4f}")

    publish_table("diverseevol-rounds", [{"round": r.round, "selected_before": r.selected_before,
                                          "added": len(r.added), "radius": round(r.radius, 4), "model": r.model[:12],
                                          "reused": r.reused} for r in done],
                  f"DiverseEvol rounds on {dataset.name}@{dataset.version}")
    selection = pl.DataFrame(rows, schema={"uid": pl.String, "score": pl.Float64, "reason": pl.String})
    print(f"diverseevol: {selection.height} of {dataset.rows} examples after {len(done)} rounds "
          f"({sum(r.reused for r in done)} reused)")
    return finish("diverseevol", params, dataset, selection, signals)
