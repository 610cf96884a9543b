"""WaveCoder (Yu et al. 2023, "WaveCoder: Widespread And Versatile Enhanced Instruction Tuning with
Refined Data Generation"), for code pools (e.g. code_alpaca_2k): raw code -> coreset -> generator ->
discriminator.

WaveCoder collects raw code, keeps a diverse coreset of it, lets an LLM generator write an
instruction item from each piece and an LLM discriminator check what was written. Without
``generate`` this flow is the collection and the discrimination over a registered pool of
(instruction, information, solution) examples (the selection half); with ``generate`` the generator
writes the items from the pool's code first (the generation half).

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

With ``generate``, steps 3-4 become the generator-discriminator loop over the first ``coreset_size``
picks of the coreset (the budget's count when empty), window by window (``batch_size`` pieces of code):

3'. The generator reads each piece of raw code with one good and one bad few-shot example and writes
    an item (task name, instruction, information, solution) through ``generate`` (stored with its
    provenance, the code's example uid as parent and the window as round; cached; cost cap; dry run;
    exact and near duplicates of the pool and of earlier windows dropped and counted).
3''. The discriminator of step 3 (the same signal) checks each item. The last accepted item of the
    window becomes the good example of the next window, the last rejected one (with the requirements
    it failed) the bad example; a window with none of a kind keeps the example it had.
4'. Every item made is registered as the dataset ``output``; the selection is the accepted items in
    coreset order, to the budget.

Deviations: the paper embeds with all-roberta-large-v1, here the configured sentence encoder (any
sentence-transformers model by ``encoder``); no blacklist filter (the paper drops code containing
Code Alpaca's blacklisted words); the judge runs at temperature 0 with our wording, no few-shot
examples and one line per answer (the authors' discriminator ran at temperature 1 with a bad example
in its prompt, and a generation accepted there when its overall answer was not "no"; here every
answer must be yes). ``coreset_size`` caps the k-center ordering (by default the whole filtered pool is
ordered, which costs one pass over the pool per pick). Generation: the paper's generator (GPT-3.5) is
given task definitions written by GPT-4 for each of four code tasks and draws its examples from an
example database; here one prompt in our words lets the generator choose among the four tasks, with one
good and one bad example (the first of each ours, then the latest accepted and rejected items), greedy;
the near-duplicate step (``dedup_tau``) and the cost cap (``max_calls``, ``max_tokens``, over the
generator's and the discriminator's calls) are ours.
"""

from __future__ import annotations

import json

import polars as pl
from prefect import flow
from pydantic import Field, field_validator

from sft_select.flows.common import MethodParams, SelectionRef, finish
from sft_select.tasks.backends.chat import LLM, get_llm
from sft_select.tasks.cluster import select_kcenter
from sft_select.tasks.embed import embed, embed_signal
from sft_select.tasks.generate import CostCap, Generation, fill_capped, generate, register_generation, requests
from sft_select.tasks.judge import estimate_llm, llm_batch, llm_signal, score_with_llm
from sft_select.tasks.prompts import (WAVECODER_CHECKLIST, WAVECODER_CHECKS, WAVECODER_FIRST_BAD, WAVECODER_FIRST_GOOD,
                                      WAVECODER_GENERATOR, format_code_task)
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
    batch_size: int = Field(32, ge=1, description="Examples per durable batch of judgements (and the smallest window; "
                                                  "with `generate`, the pieces of code of one window).")
    generate: bool = Field(False, description="Generation half: the generator writes an item from each piece of code "
                                              "of the coreset (good and bad few-shot examples), the discriminator "
                                              "checks it; the accepted items are the selection.")
    generator: str | None = Field(None, description="LLM spec of the generator; the configured default when empty.")
    dedup_tau: float | None = Field(0.9, gt=0, le=1, description="Drop a generated item whose cosine similarity to a "
                                                                 "row of the pool or an earlier item exceeds this.")
    max_calls: int | None = Field(None, ge=1, description="Cost cap: model calls (generator and discriminator).")
    max_tokens: int | None = Field(None, ge=1, description="Cost cap: tokens (prompt + completion) this run may use.")
    output: str | None = Field(None, description="Name of the generated dataset; default '<dataset>-wavecoder'.")

    @field_validator("code_chars")
    @classmethod
    def _ordered(cls, chars: tuple[int, int] | None) -> tuple[int, int] | None:
        if chars is not None and not 0 <= chars[0] <= chars[1]:
            raise ValueError(f"code_chars must be (low, high) with 0 <= low <= high, got {chars}")
        return chars


def discriminate(items: pl.DataFrame, judge: LLM, cap: CostCap, batch_size: int) -> tuple[list[str | None], dict]:
    """The checklist answers (JSON, ``None`` where the judge failed or was not asked) for generated ``items``,
    through the discriminator's own signal, under ``cap``; and the fill's counts."""
    signal = llm_signal(WAVECODER_CHECKLIST, judge)
    filled = fill_capped(signal, items, llm_batch(WAVECODER_CHECKLIST, judge), cap=cap, batch_size=batch_size,
                         estimate_rows=lambda rows: estimate_llm(signal, rows))
    answers = get_store().signals.values(signal, items["uid"], alias="answers")["answers"].to_list()
    return answers, filled


def next_examples(items: pl.DataFrame, answers: list[str | None], good: str, bad: str) -> tuple[str, str]:
    """The few-shot examples of the next window: the last accepted item (good) and the last rejected one with
    the requirements it failed (bad), each as the generator writes them; kept as they were when the window
    has none of that kind (an unparsed judgement is neither)."""
    for row, answer in zip(items.iter_rows(named=True), answers):
        if answer is None:
            continue
        fields = json.loads(row["meta"]).get("fields", {})
        text = format_code_task(fields.get("task_name", ""), row["instruction"], row["input"], row["output"])
        failed = [WAVECODER_CHECKS[k].rstrip(".") for k, ok in json.loads(answer).items() if not ok and k != "overall"]
        if accepted(answer):
            good = text
        else:
            bad = text + "\nRejected because these do not hold: " + "; ".join(failed or ["overall"]) + "."
    return good, bad


def generation_loop(params: WaveCoderParams, pool: pl.DataFrame, codes: list[str],
                    judge: LLM) -> tuple[list[Generation], dict[str, str | None], list[dict], dict]:
    """Steps 3'-3'': window by window, the generator writes an item from each piece of code (good and bad
    examples in its prompt), the discriminator checks the items, and its verdicts pick the next examples.
    Returns the generations, the checklist answers by item uid, a row of counts per window, and the
    discriminator's fill counts."""
    cap = CostCap(params.max_calls, params.max_tokens)
    code = dict(zip(pool["uid"], pool["output"]))
    good, bad = WAVECODER_FIRST_GOOD, WAVECODER_FIRST_BAD
    generations: list[Generation] = []
    verdicts: dict[str, str | None] = {}
    windows: list[dict] = []
    judged = {"computed": 0, "reused": 0, "usage": {}}
    for start in range(0, len(codes), params.batch_size):
        window = codes[start: start + params.batch_size]
        reqs = requests([{"code": code[u], "good": good, "bad": bad} for u in window], [[u] for u in window])
        earlier = pl.concat([g.examples for g in generations]) if generations else None
        made = generate(reqs, WAVECODER_GENERATOR, params.generator, method="wavecoder", round=len(generations) + 1,
                        pool=pool, earlier=earlier, dedup_tau=params.dedup_tau, encoder=params.encoder, cap=cap,
                        batch_size=params.batch_size)
        generations.append(made)
        answers, filled = discriminate(made.examples, judge, cap, params.batch_size)
        verdicts.update(zip(made.examples["uid"], answers))
        for k in ("computed", "reused"):
            judged[k] += filled[k]
        for k, v in filled["usage"].items():
            judged["usage"][k] = judged["usage"].get(k, 0.0) + v
        good, bad = next_examples(made.examples, answers, good, bad)
        windows.append({"window": made.round, "code": len(window), "items": made.report["generated"],
                        "unparsed": made.report["parse_failures"],
                        "duplicates": made.report["exact_duplicates"] + made.report["near_duplicates"],
                        "accepted": sum(accepted(a) for a in answers),
                        "rejected": sum(a is not None and not accepted(a) for a in answers),
                        "undecided": sum(a is None for a in answers)})
        if cap.hit:
            print(f"wavecoder: {cap.hit}; what was made so far is kept")
            break
    return generations, verdicts, windows, judged


@flow(name="wavecoder", log_prints=True)
def wavecoder(params: WaveCoderParams) -> SelectionRef:
    """Order the code by a k-center greedy coreset; keep the examples the discriminator accepts
    (every checklist answer yes), in coreset order, to the budget. With ``generate``, the generator first
    writes an item from each piece of code of the coreset, and the accepted items are kept."""
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
    size = params.coreset_size or (m if params.generate else len(eligible))
    core = select_kcenter(vectors, dataset, min(size, len(eligible)), seed=params.seed, within=eligible)

    judge = get_llm(params.judge)
    signal = llm_signal(WAVECODER_CHECKLIST, judge)
    params = params.model_copy(update={"judge": signal.model})  # the selection records the judge
    if params.generate:
        return generation_half(params, dataset, core.uids, core.distances, judge, embedded, m)

    # 3. discriminator, window by window down the coreset
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


def generation_half(params: WaveCoderParams, dataset: DatasetRef, codes: list[str], distances: list[float | None],
                    judge: LLM, embedded: SignalRef, m: int) -> SelectionRef:
    """Steps 3'-4': the generator-discriminator loop over the coreset's code, the items registered as a
    dataset, the accepted ones selected in coreset order."""
    generations, verdicts, windows, judged = generation_loop(params, dataset.read(), codes, judge)
    output = params.output or f"{dataset.name}-wavecoder"
    ref = register_generation(output, *generations, source=f"generated: wavecoder from the code of {dataset.name}@"
                              f"{dataset.version} by {generations[0].report['generator'] if generations else '-'}")
    if ref is None:
        raise ValueError(f"wavecoder: no item was made from {len(codes)} pieces of code (see the signals' errors)")
    pick = {u: t for t, u in enumerate(codes)}
    rows = []
    for g in generations:
        for uid, meta in zip(g.examples["uid"], g.examples["meta"]):
            t = pick[json.loads(meta)["generated"]["parents"][0]]
            if accepted(verdicts.get(uid)):
                rows.append({"uid": uid, "score": distances[t], "reason": f"written from coreset pick {t + 1} in window "
                             f"{g.round}; every checklist answer yes", "pick": t})
    schema = {"uid": pl.String, "score": pl.Float64, "reason": pl.String, "pick": pl.Int64}
    selection = pl.DataFrame(rows, schema=schema).sort("pick", maintain_order=True).drop("pick").head(m)
    publish_table("wavecoder-generation", windows, f"WaveCoder generation from {len(codes)} pieces of code of "
                  f"{dataset.name}@{dataset.version}: items per window, checked by {judge.name}")
    made = sum(w["items"] for w in windows)
    print(f"wavecoder generation: {len(codes)} pieces of code in {len(windows)} windows -> {made} items "
          f"({sum(w['unparsed'] for w in windows)} unparsed, {sum(w['duplicates'] for w in windows)} duplicates "
          f"dropped) -> {sum(w['accepted'] for w in windows)} accepted, {sum(w['rejected'] for w in windows)} "
          f"rejected, {sum(w['undecided'] for w in windows)} undecided; {selection.height} kept (budget {m})")
    checked = SignalRef(signal_id=llm_signal(WAVECODER_CHECKLIST, judge).id, name=WAVECODER_CHECKLIST.name,
                        fingerprint=ref.fingerprint, rows=len(verdicts), computed=judged["computed"],
                        reused=judged["reused"], errors=sum(v is None for v in verdicts.values()), usage=judged["usage"])
    refs = [embedded, checked, *[g.signal_ref(ref.fingerprint) for g in generations]]
    return finish("wavecoder", params.model_copy(update={"output": output}), ref, selection, refs, failed=0)


__all__ = ["WaveCoderParams", "accepted", "discriminate", "generation_loop", "merge_refs", "next_examples",
           "wavecoder"]
