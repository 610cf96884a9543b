"""MoDS (Du et al. 2023, "MoDS: Model-oriented Data Selection for Instruction Tuning").

Algorithm (quality, coverage, necessity):
  1. Quality. A reward model scores every (instruction [+ input], output); keep the examples whose
     reward is above ``quality_threshold`` (alpha = 0.0 in the paper, with OpenAssistant's
     reward-model-deberta-v3-large-v2): the high-quality set Q.
  2. Coverage. Embed the instruction alone (the paper: bert-base-uncased's [CLS] state, inputs cut
     at 96 tokens) and pick the seed set S from Q by k-center greedy (Sener & Savarese 2018),
         u = argmax_{i in Q} min_{c in S} ||x_i - x_c||,
     from one random start, until |S| = k (the paper: 1,000 seeds).
  3. Necessity. Fine-tune the base model on S (the initial LLM), let it answer every instruction of
     Q, score each (instruction, generated answer) with the same reward model, and call necessary
     the instructions whose answer scores below ``necessity_threshold``: the model has not learned
     them yet. Their examples (with the dataset's own answers) form the augmented set A.
  4. Result = S + A (the paper: 4,000 of 214k, which trained a better LLaMA-2-7B than all 214k).

Budget rule (the paper fixes thresholds and takes what they give; here a budget m caps it): the
seeds are ``seeds`` examples (a count, or a fraction of m: default 0.25, the paper's 1,000 seeds of
its 4,000), never more than m. When S + A exceeds m, A is cut to m - |S| by ``cut``: ``kcenter``
(default) continues the k-center greedy from the seeds over A, so the cut keeps the necessary
examples that add the most coverage; ``lowest_reward`` keeps those whose generated answer scored
lowest. When S + A falls short of m the selection is smaller (nothing else is necessary), unless
``fill`` continues the k-center greedy from S + A over the rest of Q. No budget (empty): S + A whole,
with ``seeds`` then a count (or a fraction of Q). The order of the selection: the seeds in pick order
(score empty), then the necessary examples (score: the reward of the seed model's answer).

Deviations: the reward model is any local sequence-classification checkpoint (``reward_model``);
offline the default is a small reward model the project trains once (``tasks/reward.py``: TRL's
reward trainer on the preference file shipped in ``flows/data/reward_pairs.jsonl``, SmolLM2-135M
with its top layers trained), far weaker than the paper's DeBERTa-v3-large, and its scores sit on its
own scale (centred near 0 by training, so the 0.0 thresholds split at "typical"). The instruction is
embedded with the configured sentence encoder (all-MiniLM-L6-v2, cut at 96 tokens) instead of BERT's
[CLS]. The seed model is the configured base fine-tuned with the project's recipe (LoRA; the paper:
full fine-tuning of LLaMA-2-7B, 3 epochs, lr 2e-5) and answers greedily with at most
``max_new_tokens`` tokens (the paper's script: beam search, 4 beams, up to 1,024 tokens). The reward
model reads a prompt as the canonical example's user turn, the instruction, a blank line and the
input (the paper: a single newline). The seeds' own generated answers are not scored (they are in
the selection anyway). The budget rule above is ours; the authors' merge step keeps every necessary
instruction.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import polars as pl
from prefect import flow
from pydantic import Field, model_validator

from sft_select.flows.common import MethodParams, SelectionRef, finish
from sft_select.tasks.cluster import kcenter_greedy
from sft_select.tasks.embed import embed, embed_signal, load_vectors
from sft_select.tasks.evaluate import generate
from sft_select.tasks.finetune import Recipe, finetune_task
from sft_select.tasks.report import histogram_rows, publish_table
from sft_select.tasks.reward import (DEFAULT, DEFAULT_BASE, RewardRecipe, resolve_reward_model, reward,
                                     reward_signal, score_answers_task)
from sft_select.tasks.select import resolve_budget
from sft_select.tasks.signal_task import DatasetRef, get_store

PAPER_SEED_SHARE = 1000 / 4000  # the paper's 1,000 seed instructions of its 4,000 selected


class MoDSParams(MethodParams):
    reward_model: str = Field(
        DEFAULT, description="Reward model of both the quality and the necessity scores: a local Hugging Face "
                             "sequence-classification checkpoint folder (one output), or 'default': a small reward "
                             "model trained once here on reward_pairs.")
    reward_pairs: str | None = Field(None, description="Preference file the default reward model is trained on; "
                                                       "empty: the file shipped with the project.")
    reward_base: str = Field(DEFAULT_BASE, description="Model the default reward model is trained from.")
    reward_recipe: RewardRecipe = Field(RewardRecipe(), description="How the default reward model is trained.")
    reward_max_length: int = Field(512, ge=16, description="Tokens of (prompt, answer) the reward model reads.")
    quality_threshold: float = Field(0.0, description="alpha: keep examples whose reward is above this (the "
                                                      "paper's 0.0).")
    necessity_threshold: float = Field(0.0, description="beta: an instruction is necessary when the seed model's "
                                                        "answer scores below this.")
    seeds: float = Field(PAPER_SEED_SHARE, gt=0, description="Seed examples: a count (>= 1), or a fraction (< 1) of "
                                                             "the budget (of the high-quality set without one).")
    encoder: str | None = Field(None, description="Sentence encoder of the instructions; the configured default "
                                                  "when empty.")
    max_tokens: int = Field(96, ge=8, description="Instructions are cut at this many tokens before embedding "
                                                  "(the paper's 96).")
    base: str = Field("smollm2-135m-instruct", description="Model fine-tuned on the seeds (the initial LLM).")
    recipe: Recipe = Field(Recipe(), description="Fine-tuning recipe of the seed model.")
    max_new_tokens: int = Field(256, ge=1, description="Greedy answer length of the seed model.")
    generation_batch_size: int = Field(16, ge=1, description="Instructions answered together (each batch stored as "
                                                             "it completes).")
    cut: Literal["kcenter", "lowest_reward"] = Field(
        "kcenter", description="Which necessary examples stay when seeds + necessary exceed the budget: k-center "
                               "greedy from the seeds (coverage), or the lowest answer rewards.")
    fill: bool = Field(False, description="When seeds + necessary fall short of the budget, fill it by k-center "
                                          "greedy over the other high-quality examples.")
    batch_size: int = Field(32, ge=1, description="Examples per durable batch of rewards.")

    @model_validator(mode="after")
    def _seed_count(self) -> MoDSParams:
        if self.seeds > 1 and not float(self.seeds).is_integer():
            raise ValueError(f"seeds {self.seeds} is neither a count (a whole number) nor a fraction (< 1)")
        return self


def seed_count(seeds: float, m: int | None, high_quality: int) -> int:
    """How many seeds: a count as it is, a fraction of the budget (or of the high-quality set when
    there is no budget), at least 1; never more than the budget or the high-quality set."""
    k = int(seeds) if seeds >= 1 else int(np.ceil(seeds * (m if m is not None else high_quality)))
    return max(1, min(k, high_quality, m if m is not None else high_quality))


def continue_kcenter(vectors: np.ndarray, chosen: list[int], candidates: list[int], extra: int) -> list[int]:
    """``extra`` of ``candidates`` (row indices), picked by k-center greedy continued from ``chosen``:
    each pick is the candidate farthest from everything chosen so far. In pick order."""
    if extra <= 0 or not candidates:
        return []
    rows = list(chosen) + list(candidates)
    order, _ = kcenter_greedy(vectors[rows], len(chosen) + min(extra, len(candidates)),
                              seeds=list(range(len(chosen))) or None)
    return [rows[i] for i in order[len(chosen):]]  # without chosen rows the random start is a pick too


def combine(seeds: list[str], necessary: pl.DataFrame, vectors: dict[str, np.ndarray], m: int | None,
            cut: str, fill_from: list[str] | None = None) -> tuple[list[str], list[str], list[str]]:
    """The budget rule: (seeds, necessary kept, fill picks). ``necessary``: ``uid, reward`` of the
    seed model's answers below the threshold."""
    kept = necessary.sort(["reward", "uid"])["uid"].to_list()
    room = None if m is None else m - len(seeds)
    if room is not None and len(kept) > room:
        if cut == "lowest_reward":
            kept = kept[:room]
        else:
            uids = seeds + kept
            x = np.stack([vectors[u] for u in uids])
            picks = continue_kcenter(x, list(range(len(seeds))), list(range(len(seeds), len(uids))), room)
            kept = [uids[i] for i in picks]
    filled: list[str] = []
    if fill_from and room is not None and len(kept) < room:
        taken = set(seeds) | set(kept)
        rest = [u for u in fill_from if u not in taken]
        uids = seeds + kept + rest
        x = np.stack([vectors[u] for u in uids])
        n = len(seeds) + len(kept)
        filled = [uids[i] for i in continue_kcenter(x, list(range(n)), list(range(n, len(uids))), room - len(kept))]
    return seeds, kept, filled


@flow(name="mods", log_prints=True)
def mods(params: MoDSParams) -> SelectionRef:
    """Keep high-reward examples; seeds by k-center greedy on instructions; add the instructions a
    model tuned on the seeds still answers badly."""
    dataset = DatasetRef.load(params.dataset, params.dataset_version)
    pool = dataset.read().sort("uid")
    store = get_store()
    m = resolve_budget(params.budget, dataset.rows) if params.budget is not None else None

    # 1. quality: reward of the dataset's own answers, keep > alpha
    identity = resolve_reward_model(params.reward_model, params.reward_pairs, params.reward_base,
                                    params.reward_recipe)
    params = params.model_copy(update={"reward_model": identity})  # the selection records the model used
    signal = reward_signal(identity, max_length=params.reward_max_length)
    rated = reward(signal, dataset, batch_size=params.batch_size)
    quality = store.signals.values(signal, pool["uid"], alias="reward")
    high = quality.filter(pl.col("reward") > params.quality_threshold)

    # 2. coverage: seeds by k-center greedy on the instructions' embeddings
    vector_signal = embed_signal(params.encoder, field="instruction", max_tokens=params.max_tokens)
    embedded = embed(vector_signal, dataset)
    have, x = load_vectors(vector_signal, high["uid"])
    if not have:
        raise ValueError(f"mods: no example of {dataset.name} has a reward above {params.quality_threshold} and an "
                         "embedding; lower quality_threshold or check the reward model")
    vectors = dict(zip(have, x))
    k = seed_count(params.seeds, m, len(have))
    order, radius = kcenter_greedy(x, k, seed=params.seed)
    seeds = [have[i] for i in order]

    # 3. necessity: the seed model answers the other high-quality instructions; low rewards are necessary
    seed_examples = pool.join(pl.DataFrame({"uid": seeds}), on="uid", how="semi")
    tuned = finetune_task(seed_examples, params.base, params.recipe)
    probe = pool.join(pl.DataFrame({"uid": [u for u in have if u not in set(seeds)]}), on="uid", how="semi")
    prompts = [msgs[:-1] for msgs in probe["messages"].to_list()]
    answers = generate(tuned, prompts, max_new_tokens=params.max_new_tokens, batch_size=params.generation_batch_size)
    texts = [a.text for a in answers]
    answered = [i for i, t in enumerate(texts) if t is not None]
    scores = score_answers_task(signal, [prompts[i] for i in answered], [texts[i] for i in answered],
                                batch_size=params.batch_size)
    generated = pl.DataFrame({"uid": [probe["uid"][i] for i in answered], "reward": scores},
                             schema={"uid": pl.String, "reward": pl.Float64})
    necessary = generated.filter(pl.col("reward") < params.necessity_threshold)

    # 4. seeds + necessary, under the budget
    seeds, kept, filled = combine(seeds, necessary, vectors, m, params.cut, have if params.fill else None)
    answer_reward = dict(generated.iter_rows())
    rows = ([{"uid": u, "score": None, "reason": f"seed {i + 1} of {len(seeds)} (k-center greedy on instructions)"}
             for i, u in enumerate(seeds)]
            + [{"uid": u, "score": answer_reward[u], "reason": f"necessary: the seed model's answer scored "
                f"{answer_reward[u]:.4f} < {params.necessity_threshold}"} for u in kept]
            + [{"uid": u, "score": answer_reward.get(u), "reason": "fill: k-center greedy over the high-quality set"}
               for u in filled])
    selection = pl.DataFrame(rows, schema={"uid": pl.String, "score": pl.Float64, "reason": pl.String})

    publish_table("mods-stages", [
        {"stage": "pool", "examples": dataset.rows},
        {"stage": f"reward > {params.quality_threshold} (quality)", "examples": high.height},
        {"stage": "seeds (k-center greedy)", "examples": len(seeds)},
        {"stage": "answered by the seed model", "examples": generated.height},
        {"stage": f"answer reward < {params.necessity_threshold} (necessary)", "examples": necessary.height},
        {"stage": "necessary kept", "examples": len(kept)},
        {"stage": "fill", "examples": len(filled)},
        {"stage": "selected", "examples": selection.height}],
        f"MoDS on {dataset.name}@{dataset.version}: reward model {identity}")
    publish_table("mods-answer-rewards", histogram_rows(generated["reward"], missing="not scored"),
                  "Rewards of the seed model's answers")
    print(f"mods: {high.height} of {dataset.rows} above reward {params.quality_threshold}; {len(seeds)} seeds "
          f"(covering radius {radius:.4f}); {necessary.height} of {generated.height} answers of the seed model below "
          f"{params.necessity_threshold}, {len(kept)} kept" + (f", {len(filled)} filled" if filled else "")
          + f"; {selection.height} selected ({rated.computed} rewards computed now, {rated.reused} reused)")
    return finish("mods", params, dataset, selection, [rated, embedded])
