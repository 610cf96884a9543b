"""generate: new instruction data written by a generator LLM, paid for once, traceable row by row,
deduplicated, capped in cost, and registered as a dataset that every selection method, ``export``
and ``compare`` read like any other pool. Used by the generating methods (Humpback's
backtranslation, TEGIT; the generation halves of LIFT, Tree-Instruct and WaveCoder build on it too).

How a generating method uses it (plain functions; a flow calls them in order)::

    reqs = requests(fields=[{"text": t} for t in texts],          # the prompt template's fields
                    parents=[[text_id(t)] for t in texts],        # what each row comes from
                    given=[{"output": t} for t in texts])          # example fields already known
    made = generate(reqs, HUMPBACK_BACKWARD, llm, method="backtranslation", round=1,
                    pool=seed, dedup_tau=0.9, cap=CostCap(max_calls=500))
    made.examples      # kept rows, canonical schema; ``meta`` holds each row's provenance
    made.report        # requested, reused, computed, errors, exact/near duplicates, stopped, usage
    ref = register_generation("seed-backtranslation", made, extra=seed)   # a dataset, by content

1. A **request** is one generator call: the template's ``fields``, the ``parents`` it is made from
   (example uids, or ``text:<sha>`` ids of source documents, :func:`text_id`), the example fields
   already known (``given``) and a sample index (``samples > 1`` asks several times). Its ``uid`` is
   sha256 of all four, so the same call is the same request in every run.
2. The answers are the LLM signal of the prompt and the generator (:func:`~sft_select.tasks.judge.llm_signal`:
   model, prompt name, version, wording hash, temperature, max tokens), keyed by request uid and filled
   through :meth:`SignalStore.fill <sft_select.storage.signals.SignalStore.fill>`: each batch is on disk
   before the next starts (a killed run re-pays at most the batch in flight), a second run with the same
   inputs makes no call, two runs never pay for one request twice, and the raw text of every answer is
   kept. ``prompt.parse(raw)`` returns JSON: one object of example fields (``instruction``, ``input``,
   ``output``) or a list of them; an answer that does not parse is a stored error with its raw text,
   counted in ``errors`` (final at temperature 0, asked again by a later run otherwise).
3. Each parsed answer, completed by ``given``, becomes a canonical example whose ``meta`` holds
   ``{"generated": {method, round, parents, generator, prompt, prompt_version, signal, request}}``
   (:func:`provenance` reads it back; ``sft-select datasets --provenance NAME`` prints it). Its
   ``source`` is ``generated:<method>``.
4. **Duplicates** are dropped and counted: *exact* (the same content uid as a row of ``pool``, of
   ``earlier`` generations, or of a row kept before it), then *near* (cosine similarity of the
   sentence embeddings of the whole example above ``dedup_tau`` to any of those, walked in request
   order; embeddings are the shared ``embed`` signal, so the pool is embedded once for every run).
   ``dedup_tau=None`` skips the near step.
5. **Cost cap** (:class:`CostCap`): the calls and tokens this run may pay for. Before each batch the
   fill checks what was spent; a batch is cut to the calls left, and once either cap is reached the
   fill stops after writing what it has, and ``report["stopped"]`` says why. What was made so far is
   kept and registered; the same run with a higher cap pays only for the rest. Tokens are known after
   a call, so the token cap may be overshot by at most one batch.
6. **Dry run** (``sft-select run METHOD --dry-run``): under :func:`~sft_select.tasks.signal_task.dry_run`
   nothing is called; the requests that lack an answer are counted with an estimated token count
   (prompt characters / 4 + ``max_tokens`` per call) into the plan, and the run stops there
   (``NotFilled``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from sft_select.storage import BatchResult, FillAborted, NotFilled, Signal
from sft_select.storage.examples import frame, make_example, normalise_text
from sft_select.storage.signals import Compute, canonical_json
from sft_select.tasks.backends.chat import LLM, get_llm, usage_of
from sft_select.tasks.judge import Prompt, llm_signal, service_failure
from sft_select.tasks.signal_task import DatasetRef, get_store, log, planning

REQUEST_SCHEMA = {"uid": pl.String, "parents": pl.List(pl.String), "fields": pl.String, "given": pl.String,
                  "sample": pl.Int32}


def text_id(text: str) -> str:
    """The content id of a source document or unlabelled text: ``text:`` + sha256 of its normalised text."""
    return "text:" + hashlib.sha256(normalise_text(text).encode()).hexdigest()[:32]


def requests(fields: Sequence[dict[str, Any]], parents: Sequence[Sequence[str]],
             given: Sequence[dict[str, Any]] | None = None, samples: int = 1) -> pl.DataFrame:
    """One row per generator call (``samples`` per item): ``uid, parents, fields, given, sample``."""
    if len(parents) != len(fields) or (given is not None and len(given) != len(fields)):
        raise ValueError("fields, parents and given must be as long as each other")
    rows = []
    for i, (f, p) in enumerate(zip(fields, parents)):
        g = given[i] if given is not None else {}
        for k in range(samples):
            key = canonical_json([f, g, list(p), k])
            rows.append({"uid": hashlib.sha256(key.encode()).hexdigest()[:32], "parents": list(p),
                         "fields": canonical_json(f), "given": canonical_json(g), "sample": k})
    return pl.DataFrame(rows, schema=REQUEST_SCHEMA).unique("uid", maintain_order=True)


def read_texts(spec: str, field: str = "output") -> list[str]:
    """Unlabelled texts or documents: a registered dataset's ``field`` (its outputs by default: the
    responses with their instructions removed), or a file: ``.txt`` (blocks separated by a blank line),
    ``.jsonl``/``.json`` (strings, or records with ``text``, ``document``, ``content`` or ``output``).
    Empty texts are left out and repeats kept once, in order."""
    store, path = get_store(), Path(spec).expanduser()
    if not path.exists():
        try:
            texts = store.datasets.read(spec, columns=[field])[field].to_list()
        except KeyError:
            raise ValueError(f"{spec!r} is neither a file nor a registered dataset") from None
    elif path.suffix == ".txt":
        texts = path.read_text(encoding="utf-8").split("\n\n")
    else:
        raw = path.read_text(encoding="utf-8")
        records = json.loads(raw) if path.suffix == ".json" else [json.loads(ln) for ln in raw.splitlines()
                                                                  if ln.strip()]
        texts = []
        for r in records:
            if isinstance(r, str):
                texts.append(r)
                continue
            key = next((k for k in ("text", "document", "content", field) if isinstance(r.get(k), str)), None)
            if key is None:
                raise ValueError(f"{path.name}: a record has none of the fields text, document, content, {field}")
            texts.append(r[key])
    seen: set[str] = set()
    out = []
    for t in (normalise_text(t or "") for t in texts):
        if t and t not in seen:
            seen.add(t)
            out.append(t)
    return out


@dataclass
class CostCap:
    """What a run may pay for: model ``max_calls`` and ``max_tokens`` (prompt + completion), each
    ``None`` for no cap. One cap may be shared by every stage of a flow (:meth:`wrap` each batch
    function); ``spent`` is what the wrapped functions paid in this run, ``hit`` why it stopped."""

    max_calls: int | None = None
    max_tokens: int | None = None
    spent: dict[str, float] = field(default_factory=lambda: {"calls": 0.0, "tokens": 0.0})
    hit: str | None = None

    def left(self) -> int | None:
        """Calls left under the cap (``None``: no call cap)."""
        return None if self.max_calls is None else max(self.max_calls - int(self.spent["calls"]), 0)

    def reached(self) -> str | None:
        if self.max_calls is not None and self.spent["calls"] >= self.max_calls:
            return f"cost cap reached: {int(self.spent['calls'])} calls of max_calls={self.max_calls}"
        if self.max_tokens is not None and self.spent["tokens"] >= self.max_tokens:
            return f"cost cap reached: {int(self.spent['tokens'])} tokens of max_tokens={self.max_tokens}"
        return None

    def wrap(self, compute: Compute) -> Compute:
        """``compute`` under the cap: a batch is cut to the calls left (the rest are not asked and not
        stored) and, once the cap is reached, the batch asks nothing and the fill stops (``abort``)."""

        def capped(batch: pl.DataFrame) -> BatchResult:
            reason = self.reached()
            if reason is not None:
                self.hit = reason
                return BatchResult([None] * batch.height, {}, abort=reason)
            left = self.left()
            part = batch if left is None or left >= batch.height else batch.head(left)
            result = compute(part)
            self.spent["calls"] += result.usage.get("calls", 0.0)
            self.spent["tokens"] += result.usage.get("prompt_tokens", 0.0) + result.usage.get("completion_tokens", 0.0)
            if part.height < batch.height:
                self.hit = f"cost cap reached: {int(self.spent['calls'])} calls of max_calls={self.max_calls}"
                return BatchResult(result.outcomes + [None] * (batch.height - part.height), result.usage,
                                   abort=result.abort or self.hit)
            return result

        return capped


@dataclass
class Generation:
    """What :func:`generate` made: the kept rows (canonical, provenance in ``meta``), the signal of
    the answers, and the counts (``report``)."""

    examples: pl.DataFrame
    signal: Signal
    report: dict[str, Any]
    method: str
    round: int


def generation_batch(prompt: Prompt, llm: LLM) -> Compute:
    """The batch function of a generation signal: each request's ``fields`` into the prompt's
    template, one batched ``llm.chat``, each answer parsed (or stored as an error with its raw text)."""

    def compute(batch: pl.DataFrame) -> BatchResult:
        conversations = [prompt.conversation(**json.loads(f)) for f in batch["fields"]]
        results = llm.chat(conversations, temperature=prompt.temperature, max_tokens=prompt.max_tokens)
        return BatchResult([prompt.outcome(r) for r in results], usage_of(results), abort=service_failure(llm, results))

    return compute


def estimate(prompt: Prompt, reqs: pl.DataFrame) -> dict[str, float]:
    """Calls and tokens of asking ``reqs``: characters / 4 of each rendered prompt, plus ``max_tokens``."""
    chars = sum(len(m["content"]) for f in reqs["fields"] for m in prompt.conversation(**json.loads(f)))
    return {"calls": float(reqs.height), "prompt_tokens": chars / 4,
            "completion_tokens": float(prompt.max_tokens * reqs.height)}


def fill_capped(signal: Signal, rows: pl.DataFrame, compute: Compute, *, cap: CostCap | None = None,
                batch_size: int = 16, estimate_rows: Callable[[pl.DataFrame], dict[str, float]] | None = None,
                max_attempts: int = 3) -> dict[str, Any]:
    """Fill ``signal`` for ``rows`` (a frame with ``uid``) under ``cap``; returns the fill's counts and
    ``stopped`` (why a cap ended it early, else ``None``). A failure of the service is raised. Under a
    dry run, records the rows that lack a value (with ``estimate_rows``) and raises ``NotFilled``."""
    store = get_store()
    plan = planning()
    if plan is not None:
        unique = rows.unique("uid", maintain_order=True)
        missing = store.signals.missing(signal, unique["uid"], max_attempts)
        todo = unique.filter(pl.col("uid").is_in(missing))
        plan.add(signal, unique.height, todo.height, estimate_rows(todo) if estimate_rows and todo.height else {})
        if missing:
            store.signals.planned.add(signal.id)
            raise NotFilled(f"{signal.id}: {len(missing)} calls planned; a dry run stops before generating")
        return {"requested": unique.height, "reused": unique.height, "computed": 0, "stopped": None, "usage": {}}
    cap = cap or CostCap()
    try:
        report = store.signals.fill(signal, rows, cap.wrap(compute), batch_size=batch_size, max_attempts=max_attempts)
        stopped = None
    except FillAborted as e:
        if cap.hit is None or not str(e).endswith(cap.hit):
            raise
        report, stopped = e.report, cap.hit
        log.warning("%s: %s; what was made so far is kept (a run with a higher cap pays only for the rest)",
                    signal.id, stopped)
    return {"requested": report.requested, "reused": report.reused, "computed": report.computed,
            "errors_now": report.errors, "stopped": stopped, "usage": report.usage}


def generate(reqs: pl.DataFrame, prompt: Prompt, llm: LLM | str | None, *, method: str, round: int = 1,
             pool: pl.DataFrame | None = None, earlier: pl.DataFrame | None = None, dedup_tau: float | None = 0.9,
             encoder: str | None = None, cap: CostCap | None = None, batch_size: int = 16) -> Generation:
    """Ask ``llm`` (a backend or a spec) for every request that has no stored answer, parse, attach
    provenance, drop duplicates of ``pool`` and ``earlier`` (canonical frames) and of each other.
    The generator is named in the signal by ``llm.name`` (a fine-tuned model as ``local:finetuned:<key>``,
    by content). See the module docstring for the whole contract."""
    llm = llm if isinstance(llm, LLM) else get_llm(llm)
    signal = llm_signal(prompt, llm)
    filled = fill_capped(signal, reqs.select("uid", "fields"), generation_batch(prompt, llm), cap=cap,
                         batch_size=batch_size, estimate_rows=lambda todo: estimate(prompt, todo))
    stored = get_store().signals.read(signal, reqs["uid"])
    answered = reqs.join(stored.select("uid", "value", "error"), on="uid", how="inner", maintain_order="left")
    rows: list[dict[str, Any]] = []
    for r in answered.iter_rows(named=True):
        if r["error"] is not None:
            continue
        items = json.loads(r["value"])
        for item in items if isinstance(items, list) else [items]:
            rows.append(_example(item, r, signal, method, round))
    errors = answered.filter(pl.col("error").is_not_null())
    parse_failures = int(errors["error"].str.starts_with("parse:").sum())
    made = frame(rows) if rows else frame([])
    kept, exact, near = drop_duplicates(made, pool, earlier, dedup_tau, encoder)
    report = {"method": method, "round": round, "generator": signal.model, "signal": signal.id,
              "prompt": prompt.name, "prompt_version": prompt.version, "requests": reqs.height,
              "answered": answered.height - errors.height, "reused": filled["reused"], "computed": filled["computed"],
              "errors": errors.height, "parse_failures": parse_failures, "unanswered": reqs.height - answered.height,
              "generated": made.height, "exact_duplicates": exact, "near_duplicates": near, "kept": kept.height,
              "stopped": filled["stopped"], "usage": filled["usage"]}
    log.info("%s round %d: %d requests -> %d generated (%d stored before, %d computed now, %d failed, %d not asked) "
             "-> %d kept (%d exact and %d near duplicates dropped)%s", method, round, reqs.height, made.height,
             filled["reused"], filled["computed"], errors.height, report["unanswered"], kept.height, exact, near,
             f"; {filled['stopped']}" if filled["stopped"] else "")
    return Generation(kept, signal, report, method, round)


def _example(item: Any, request: dict[str, Any], signal: Signal, method: str, round: int) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise ValueError(f"{signal.id}: a parsed answer must be an object of example fields, got {item!r:.80}")
    fields = {**json.loads(request["given"]), **{k: v for k, v in item.items() if v is not None}}
    instruction, input, output = (str(fields.get(k) or "") for k in ("instruction", "input", "output"))
    user = f"{normalise_text(instruction)}\n\n{normalise_text(input)}" if input.strip() else instruction
    provenance = {"method": method, "round": round, "parents": request["parents"], "generator": signal.model,
                  "prompt": signal.params["prompt"], "prompt_version": signal.params["prompt_version"],
                  "signal": signal.id, "request": request["uid"]}
    extra = {k: v for k, v in fields.items() if k not in ("instruction", "input", "output")}
    return make_example([{"role": "user", "content": user}, {"role": "assistant", "content": output}],
                        source=f"generated:{method}", instruction=instruction, input=input,
                        meta={"generated": provenance, **({"fields": extra} if extra else {})})


def drop_duplicates(made: pl.DataFrame, pool: pl.DataFrame | None, earlier: pl.DataFrame | None,
                    tau: float | None, encoder: str | None = None) -> tuple[pl.DataFrame, int, int]:
    """(kept rows, exact duplicates, near duplicates): a row is dropped when its uid is that of a row of
    ``pool``, ``earlier`` or a row kept before it, or (``tau`` set) when the cosine similarity of its
    embedding to any of those exceeds ``tau``."""
    reference = pl.concat([f.select("uid", "messages", "output") for f in (pool, earlier) if f is not None and
                           f.height]) if any(f is not None and f.height for f in (pool, earlier)) else None
    known = set(reference["uid"]) if reference is not None else set()
    keep_exact = []
    for uid in made["uid"]:
        keep_exact.append(uid not in known)
        known.add(uid)
    exact_kept = made.filter(pl.Series(keep_exact, dtype=pl.Boolean)) if made.height else made
    exact = made.height - exact_kept.height
    if tau is None or exact_kept.height == 0:
        return exact_kept, exact, 0
    from sft_select.tasks.embed import build_embed, embed_signal

    store, signal = get_store(), embed_signal(encoder, field="full")
    everything = pl.concat([f for f in (reference, exact_kept.select("uid", "messages", "output")) if f is not None])
    store.signals.fill(signal, everything, build_embed(signal), batch_size=256)
    cand, present = store.signals.matrix(signal, exact_kept["uid"])
    ref = np.zeros((0, cand.shape[1]), dtype=np.float32)
    if reference is not None and reference.height:
        ref, known_rows = store.signals.matrix(signal, reference["uid"])
        ref = ref[known_rows]
    kept_rows: list[int] = []
    for i in range(exact_kept.height):
        if not present[i]:  # no embedding (it failed): kept, it cannot be compared
            kept_rows.append(i)
            continue
        v = cand[i]
        best = float((ref @ v).max()) if len(ref) else -1.0
        if kept_rows:
            best = max(best, float((cand[[k for k in kept_rows if present[k]]] @ v).max(initial=-1.0)))
        if best <= tau:
            kept_rows.append(i)
    return exact_kept[kept_rows], exact, exact_kept.height - len(kept_rows)


def register_generation(name: str, *generations: Generation, extra: pl.DataFrame | None = None,
                        source: str = "") -> DatasetRef | None:
    """Register the kept rows of ``generations`` (after ``extra`` rows, e.g. the seed data a method
    trains with) as dataset ``name``: versioned by content like an ingest, its catalog ``source``
    naming the method, rounds and generators, its ``report`` the counts of each generation. ``None``
    when there is nothing to register."""
    parts = ([extra] if extra is not None and extra.height else []) + [g.examples for g in generations if
                                                                         g.examples.height]
    if not parts:
        return None
    examples = pl.concat(parts).unique("uid", maintain_order=True)
    rounds = ", ".join(f"{g.method} round {g.round} by {g.report['generator']}" for g in generations)
    source = source or f"generated: {rounds}" + (f"; with {extra.height} given rows" if extra is not None else "")
    report = {"generations": [g.report for g in generations], "given_rows": 0 if extra is None else extra.height}
    info = get_store().datasets.register(name, examples, source=source, report=report)
    return DatasetRef.of(info)


def provenance(examples: pl.DataFrame) -> pl.DataFrame:
    """Each generated row's provenance (rows that were not generated are left out): ``uid, method,
    round, generator, prompt, prompt_version, parents, signal, request``."""
    schema = {"uid": pl.String, "method": pl.String, "round": pl.Int64, "generator": pl.String, "prompt": pl.String,
              "prompt_version": pl.String, "parents": pl.List(pl.String), "signal": pl.String, "request": pl.String}
    rows = []
    for uid, meta in zip(examples["uid"], examples["meta"]):
        g = json.loads(meta or "{}").get("generated")
        if g:
            rows.append({"uid": uid, **{k: g.get(k) for k in list(schema)[1:]}})
    return pl.DataFrame(rows, schema=schema)


__all__ = ["CostCap", "Generation", "drop_duplicates", "estimate", "fill_capped", "generate", "generation_batch",
           "provenance", "read_texts", "register_generation", "requests", "text_id"]
