"""TEGIT (Chen et al. 2023, "TeGit: Generating High-Quality Instruction-Tuning Data with Text-Grounded Task
Design"): design instruction tasks from human-written documents, and keep those a discriminator accepts.

Given documents d (``documents``; by default the non-empty inputs of the dataset, e.g. the Wikipedia
passages of dolly's inputs):

1. Task generation: a task generator reads each document and writes one task grounded in it,
   (instruction, input, output) together (unlike backtranslation, the document is not taken as the
   output as it is). Each task is stored as it is made, with its provenance (the document's content
   id, the generator, the prompt, the round), deduplicated against the dataset and earlier tasks.
2. Task discrimination: a task discriminator accepts or rejects each task with a reason (grounded in
   the document, doable, a correct and complete output). Its raw answer and the parsed
   ``{accept, reason}`` are a signal; an answer with no decision is a recorded failure (not accepted).
3. Optionally (``finetune_generator``), as the paper trains its open generator on a meta set made by a
   strong model: the tasks accepted for the first ``meta_documents`` documents become the meta set,
   ``base`` is fine-tuned on it with fine-tune-seed-model (the generator's prompt in, the task out),
   and the fine-tuned generator (named by its content key) writes the tasks of the remaining documents
   (round 2), which the discriminator checks too.
4. Every task made is registered as the dataset ``output``; the selection is the accepted tasks, each
   with the discriminator's reason.

Deviations: the paper fine-tunes Llama-2 generators and discriminators on a ChatGPT-made meta set and
releases no code; here both roles are prompted LLMs (any backend) with prompts in our words to the
paper's description, the discriminator a prompted model only (not fine-tuned), greedy decoding, one
task a document. The near-duplicate step (``dedup_tau``) and the cost cap are ours.
"""

from __future__ import annotations

import json

import polars as pl
from prefect import flow
from pydantic import Field

from sft_select.flows.backtranslation import trained
from sft_select.flows.common import MethodParams, SelectionRef, finish
from sft_select.storage.examples import frame, make_example
from sft_select.tasks.backends.chat import get_llm
from sft_select.tasks.finetune import Recipe
from sft_select.tasks.generate import (CostCap, Generation, estimate, fill_capped, generate, generation_batch,
                                       read_texts, register_generation, requests, text_id)
from sft_select.tasks.judge import llm_signal
from sft_select.tasks.prompts import TEGIT_DISCRIMINATOR, TEGIT_TASK, format_task
from sft_select.tasks.report import publish_table
from sft_select.tasks.signal_task import DatasetRef, SignalRef, get_store


class TegitParams(MethodParams):
    budget: float | None = Field(None, description="At most this many accepted tasks; empty: every accepted task.")
    documents: str | None = Field(None, description="The documents: a .txt (blank-line separated) or .jsonl/.json "
                                                    "file, or a registered dataset; empty: this dataset.")
    documents_field: str = Field("input", description="The field that holds the documents when they come from a "
                                                      "dataset (dolly's inputs are Wikipedia passages).")
    limit: int | None = Field(None, ge=1, description="Use the first this many documents.")
    generator: str | None = Field(None, description="LLM spec of the task generator; the configured default when "
                                                    "empty.")
    discriminator: str | None = Field(None, description="LLM spec of the task discriminator; the generator when empty.")
    finetune_generator: bool = Field(False, description="Fine-tune `base` on the tasks accepted for the first "
                                                        "`meta_documents` documents and let it write the rest.")
    meta_documents: int = Field(50, ge=1, description="Documents of the meta set (with finetune_generator).")
    base: str = Field("smollm2-135m-instruct", description="Base model of the fine-tuned generator.")
    recipe: Recipe = Field(Recipe(), description="How the generator is fine-tuned (fine-tune-seed-model).")
    dedup_tau: float | None = Field(0.9, gt=0, le=1, description="Drop a task whose cosine similarity to a row of "
                                                                 "the dataset or an earlier task exceeds this.")
    encoder: str | None = Field(None, description="Sentence encoder of the near-duplicate step.")
    max_calls: int | None = Field(None, ge=1, description="Cost cap: model calls this run may make.")
    max_tokens: int | None = Field(None, ge=1, description="Cost cap: tokens (prompt + completion) this run may use.")
    output: str | None = Field(None, description="Name of the generated dataset; default '<dataset>-tegit'.")
    batch_size: int = Field(16, ge=1, description="Requests per durable batch.")


def discriminate(tasks: pl.DataFrame, document: dict[str, str], discriminator: str | None, cap: CostCap,
                 batch_size: int) -> tuple[pl.DataFrame, dict]:
    """The discriminator's verdict on each task (``uid, accept, reason, error``; ``accept`` null where the
    answer had no decision) and the counts; ``document`` maps a document's content id to its text."""
    llm = get_llm(discriminator)
    signal = llm_signal(TEGIT_DISCRIMINATOR, llm)
    parents = [json.loads(m)["generated"]["parents"][0] for m in tasks["meta"]]
    rows = tasks.select("uid", pl.Series("fields", [json.dumps({
        "document": document[p], "instruction": r["instruction"], "input_or_none": r["input"] or "(none)",
        "output": r["output"]}, ensure_ascii=False) for p, r in zip(parents, tasks.iter_rows(named=True))],
        dtype=pl.String))
    filled = fill_capped(signal, rows, generation_batch(TEGIT_DISCRIMINATOR, llm), cap=cap, batch_size=batch_size,
                         estimate_rows=lambda todo: estimate(TEGIT_DISCRIMINATOR, todo))
    stored = get_store().signals.read(signal, tasks["uid"])
    verdicts = tasks.select("uid").join(stored.select("uid", "value", "error"), on="uid", how="left",
                                        maintain_order="left")
    parsed = [json.loads(v) if v is not None else {} for v in verdicts["value"]]
    verdicts = verdicts.select("uid", pl.Series("accept", [p.get("accept") for p in parsed], dtype=pl.Boolean),
                               pl.Series("reason", [p.get("reason") for p in parsed], dtype=pl.String), "error")
    counts = {"discriminator": llm.name, "signal": signal.id, "accepted": int(verdicts["accept"].sum() or 0),
              "rejected": int((~verdicts["accept"]).sum() or 0),
              "parse_failures": int(verdicts["error"].str.starts_with("parse:").sum()),
              "computed": filled["computed"], "reused": filled["reused"], "usage": filled["usage"],
              "stopped": filled["stopped"]}
    return verdicts, counts


def meta_set(tasks: pl.DataFrame, document: dict[str, str]) -> pl.DataFrame:
    """The fine-tuned generator's training data: the generator's prompt for the document in, the accepted
    task out (in the form the generator writes)."""
    rows = []
    for r in tasks.iter_rows(named=True):
        doc = document[json.loads(r["meta"])["generated"]["parents"][0]]
        rows.append(make_example(TEGIT_TASK.conversation(document=doc) + [
            {"role": "assistant", "content": format_task(r["instruction"], r["input"], r["output"])}], source="tegit-meta"))
    return frame(rows)


@flow(name="tegit", log_prints=True)
def tegit(params: TegitParams) -> SelectionRef:
    """Design a task (instruction, input, output) from each document; keep those the discriminator accepts."""
    dataset = DatasetRef.load(params.dataset, params.dataset_version)
    pool = dataset.read()
    docs = read_texts(params.documents or params.dataset, field=params.documents_field)[: params.limit]
    if not docs:
        raise ValueError(f"no documents in {params.documents or params.dataset!r} ({params.documents_field})")
    document = {text_id(d): d for d in docs}
    cap = CostCap(params.max_calls, params.max_tokens)
    first = docs[: params.meta_documents] if params.finetune_generator else docs

    def tasks_for(texts: list[str], generator: str | None, round: int, earlier: pl.DataFrame | None) -> Generation:
        reqs = requests([{"document": d} for d in texts], [[text_id(d)] for d in texts])
        return generate(reqs, TEGIT_TASK, generator, method="tegit", round=round, pool=pool, earlier=earlier,
                        dedup_tau=params.dedup_tau, encoder=params.encoder, cap=cap, batch_size=params.batch_size)

    # 1-2. tasks from the documents (the meta documents, when the generator is fine-tuned), discriminated
    generations = [tasks_for(first, params.generator, 1, None)]
    discriminator = params.discriminator or params.generator
    judged = [discriminate(generations[0].examples, document, discriminator, cap, params.batch_size)]

    # 3. optionally: fine-tune the generator on the accepted tasks, and let it write the rest
    rest = docs[len(first):]
    if params.finetune_generator and rest and not cap.hit:
        accepted = generations[0].examples.join(judged[0][0].filter(pl.col("accept")), on="uid", how="semi")
        if accepted.height:
            tuned = trained(meta_set(accepted, document), params.base, params.recipe)
            generations.append(tasks_for(rest, tuned, 2, generations[0].examples))
            judged.append(discriminate(generations[1].examples, document, discriminator, cap, params.batch_size))
        else:
            print("tegit: no task of the meta documents was accepted, so the generator is not fine-tuned")

    # 4. every task made is the dataset; the accepted ones are the selection
    output = params.output or f"{params.dataset}-tegit"
    ref = register_generation(output, *generations)
    if ref is None:
        raise ValueError(f"tegit: no task was made from {len(docs)} documents (see the signals' errors)")
    verdicts = pl.concat([v for v, _ in judged])
    selection = verdicts.filter(pl.col("accept")).select(
        "uid", pl.lit(1.0).alias("score"), pl.format("accepted: {}", pl.col("reason")).alias("reason"))
    if params.budget is not None:
        from sft_select.tasks.select import resolve_budget

        selection = selection.head(resolve_budget(params.budget, ref.rows))
    rows = []
    for g, (_, c) in zip(generations, judged):
        rows.append({"round": g.round, "generator": g.report["generator"], "documents": g.report["requests"],
                     "tasks": g.report["generated"], "parse_failures": g.report["parse_failures"],
                     "duplicates": g.report["exact_duplicates"] + g.report["near_duplicates"],
                     "accepted": c["accepted"], "rejected": c["rejected"], "undecided": c["parse_failures"]})
        print(f"tegit round {g.round}: {g.report['requests']} documents -> {g.report['generated']} tasks by "
              f"{g.report['generator']} ({g.report['parse_failures']} unparseable) -> {g.report['kept']} after "
              f"duplicates -> {c['accepted']} accepted, {c['rejected']} rejected, {c['parse_failures']} undecided")
    publish_table("tegit-rounds", rows, f"TEGIT on {len(docs)} documents")
    if cap.hit:
        print(f"tegit: {cap.hit}; what was made so far is kept")
    signals = [SignalRef(signal_id=g.signal.id, name=g.signal.name, fingerprint=ref.fingerprint,
                         rows=g.report["requests"], computed=g.report["computed"], reused=g.report["reused"],
                         errors=g.report["errors"], usage=g.report["usage"]) for g in generations]
    signals += [SignalRef(signal_id=c["signal"], name=TEGIT_DISCRIMINATOR.name, fingerprint=ref.fingerprint,
                          rows=c["accepted"] + c["rejected"] + c["parse_failures"], computed=c["computed"],
                          reused=c["reused"], errors=c["parse_failures"], usage=c["usage"]) for _, c in judged]
    return finish("tegit", params.model_copy(update={"output": output}), ref, selection, signals, failed=0)


__all__ = ["TegitParams", "discriminate", "meta_set", "tegit"]
