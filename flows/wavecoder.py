"""WaveCoder (Yu et al. 2023, "WaveCoder: Widespread And Versatile Enhanced Instruction Tuning with
Refined Data Generation"), the selection half, for code pools (e.g. code_alpaca_2k).

WaveCoder collects raw code, keeps a diverse coreset of it, lets an LLM generator write an
instruction for each piece and an LLM discriminator check what was written. This flow is the
collection and the discrimination over a registered pool of (instruction, information, solution)
examples: the pool as it is, or one that the generation half (a later issue) wrote and registered.

1. Raw-code filter: keep the examples whose code (the output) is 50 to 800 characters long.
2. Coreset: embed the code with a sentence encoder and order the filtered pool by k-center greedy
   (Sener & Savarese 2018; from one seeded-random start, each step adds the example farthest from
   those chosen: ``u = argmax_i min_{c in S} ||x_i - x_c||``).
3. Discriminator: in coreset order, a judge answers the paper's yes/no checklist for each example:
   the instruction states the programming language; the solution resolves the instruction and its
   information; the solution is only code and comments in the code; its logic is complete and not
   buried in complex or poorly documented functions; the required libraries are imported; overall.
   Every answer is stored with the example (a JSON value of the signal) and the raw text.
4. Keep the accepted examples (every answer yes) in coreset order, to the budget. The judge is asked
   only as far down the coreset as the budget needs: a window of as many examples as are still
   missing (at least one batch), then the next window, until the budget is met or the coreset ends.

Deviations: the paper embeds with all-roberta-large-v1, here the configured sentence encoder (any
sentence-transformers model by ``encoder``); no blacklist filter (the paper drops code containing
Code Alpaca's blacklisted words); the judge runs at temperature 0 with our wording, no few-shot
examples and one line per answer (the authors' discriminator ran at temperature 1 with a bad example
in its prompt, and a generation accepted there when its overall answer was not "no"; here every
answer must be yes). The discriminator's own verdicts do not feed back as few-shot examples: that
belongs to the generation loop. ``coreset_size`` caps the k-center ordering (by default the whole
filtered pool is ordered, which costs one pass over the pool per pick).
"""

from __future__ import annotations

import json

import polars as pl
from prefect import flow
from pydantic import Field, field_validator

from sft_select.flows.common import MethodParams, SelectionRef, finish
from sft_select.tasks.backends.chat import get_llm
from sft_select.tasks.cluster import select_kcenter
from sft_select.tasks.embed import embed, embed_signal
from sft_select.tasks.judge import llm_signal, score_with_llm
from sft_select.tasks.prompts import WAVECODER_CHECKLIST, WAVECODER_CHECKS
from sft_select.tasks.report import publish_table
from sft_select.tasks.select import resolve_budget
from sft_select.tasks.signal_task import DatasetRef, SignalRef, get_store

PAPER_CODE_CHARS = (50, 800)


def accepted(answers: str | None) -> bool:
    """An example passes the discriminator when every checklist answer is yes (a failed or
    unparsed judgement passes nothing)."""
    return answers is not None and all(json.loads(answers).values())


def merge_refs(refs: list[SignalRef]) -> SignalRef:
    """One signal filled in several windows, as one reference with the counts summed."""
    usage: dict[str, float] = {}
    for r in refs:
        for k, v in r.usage.items():
            usage[k] = usage.get(k, 0.0) + v
    return refs[0].model_copy(update={"rows": sum(r.rows for r in refs), "computed": sum(r.computed for r in refs),
                                      "reused": sum(r.reused for r in refs), "errors": sum(r.errors for r in refs),
                                      "by_others": sum(r.by_others for r in refs), "usage": usage})


class WaveCoderParams(MethodParams):
    code_chars: tuple[int, int] | None = Field(
        PAPER_CODE_CHARS, description="Keep code (the output) of this many characters, inclusive (paper: 50 to "
                                      "800); empty: no length filter.")
    coreset_size: int | None = Field(
        None, ge=1, description="How far down the pool the k-center greedy order goes; empty: the whole filtered "
                                "pool.")
    encoder: str | None = Field(None, description="Sentence encoder of the code; the configured default when empty.")
    judge: str | None = Field(None, description="LLM backend of the discriminator: 'openai:<model>' "
                                                "(OPENAI_BASE_URL), 'local', 'local:<model folder>'; empty: the "
                                                "configured default.")
    batch_size: int = Field(32, ge=1, description="Examples per durable batch of judgements (and the smallest window).")

    @field_validator("code_chars")
    @classmethod
    def _ordered(cls, chars: tuple[int, int] | None) -> tuple[int, int] | None:
        if chars is not None and not 0 <= chars[0] <= chars[1]:
            raise ValueError(f"code_chars must be (low, high) with 0 <= low <= high, got {chars}")
        return chars


@flow(name="wavecoder", log_prints=True)
def wavecoder(params: WaveCoderParams) -> SelectionRef:
    """Order the code by a k-center greedy coreset; keep the examples the discriminator accepts
    (every checklist answer yes), in coreset order, to the budget."""
    dataset = DatasetRef.load(params.dataset, params.dataset_version)
    m = resolve_budget(params.budget, dataset.rows)
    pool = dataset.read(["uid", "output"]).sort("uid")
    store = get_store()

    # 1. raw-code filter
    length = pl.col("output").fill_null("").str.len_chars()
    low, high = params.code_chars or (0, None)
    eligible = pool.filter(length >= low if high is None else length.is_between(low, high))["uid"].to_list()
    if not eligible:
        raise ValueError(f"no example of {dataset.name} has code of {low} to {high} characters")

    # 2. coreset of the code
    vectors = embed_signal(params.encoder, field="output")
    embedded = embed(vectors, dataset, uids=eligible)
    core = select_kcenter(vectors, dataset, min(params.coreset_size or len(eligible), len(eligible)),
                          seed=params.seed, within=eligible)

    # 3. discriminator, window by window down the coreset
    judge = get_llm(params.judge)
    signal = llm_signal(WAVECODER_CHECKLIST, judge)
    params = params.model_copy(update={"judge": signal.model})  # the selection records the judge
    kept: list[int] = []  # positions in the coreset order
    refs: list[SignalRef] = []
    judged = 0
    answers: list[str | None] = []
    while len(kept) < m and judged < len(core.uids):
        window = core.uids[judged: judged + max(m - len(kept), params.batch_size)]
        refs.append(score_with_llm(signal, dataset, batch_size=params.batch_size, uids=window))
        got = store.signals.values(signal, window, alias="answers")["answers"].to_list()
        kept += [judged + i for i, a in enumerate(got) if accepted(a)]
        answers += got
        judged += len(window)
    kept = kept[:m]

    # 4. the accepted, in coreset order
    selection = pl.DataFrame(
        {"uid": [core.uids[t] for t in kept], "score": [core.distances[t] for t in kept],
         "reason": [f"coreset pick {t + 1}" + ("" if core.distances[t] is None else
                                              f" ({core.distances[t]:.4f} from the picks before it)")
                    + "; every checklist answer yes" for t in kept]},
        schema={"uid": pl.String, "score": pl.Float64, "reason": pl.String})

    parsed = [json.loads(a) for a in answers if a is not None]
    publish_table("wavecoder-checklist",
                  [{"requirement": label, "yes": sum(p[label] for p in parsed),
                    "no": sum(not p[label] for p in parsed)} for label in WAVECODER_CHECKS]
                  + [{"requirement": "(no parseable answer)", "yes": 0, "no": len(answers) - len(parsed)}],
                  f"WaveCoder checklist by {signal.model}: the first {judged} of the coreset of "
                  f"{dataset.name}@{dataset.version}")
    print(f"wavecoder: {len(eligible)} of {dataset.rows} with {low}-{high} characters of code; coreset order of "
          f"{len(core.uids)}; {judged} judged by {signal.model} ({len(answers) - len(parsed)} unparsed), "
          f"{sum(accepted(a) for a in answers)} accepted; {selection.height} kept (budget {m})")
    return finish("wavecoder", params, dataset, selection, [embedded, merge_refs(refs)] if refs else [embedded])
