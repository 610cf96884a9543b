"""InsTag (Lu et al. 2023, "#InsTag: Instruction Tagging for Analyzing Supervised Fine-tuning of Large
Language Models").

Algorithm:
  1. Tagging: an LLM (ChatGPT in the paper) reads each query and answers with its open-set intention
     tags, each with an explanation, as JSON ``[{"tag": ..., "explanation": ...}, ...]``.
  2. Tag normalisation (``tasks/tag_normalization.py``): drop tags seen fewer than alpha = 20 times;
     rule aggregation (lowercase, symbols to spaces, stemming); semantic aggregation (tag embeddings,
     DBSCAN at t = 0.05, clusters merged); association aggregation (FP-Growth rules at minimum support
     40 and minimum confidence 99%, associated tags merged, recursively).
  3. Complexity of a query = the number of its normalised tags; diversity = the tags a set covers.
  4. Complexity-first diverse sampling (the paper's Algorithm 1), to the budget m:

         sort the pool by tag count, descending
         while |selected| < m:
             covered = {}                                   # a new pass
             for each query q not yet selected, in that order:
                 if tags(q) holds a tag not in covered:     # q brings a tag not covered in this pass
                     select q; covered |= tags(q)
                     if |selected| = m: stop

     The paper selects 6,000 of a 306,044-example pool (1.96%), the default budget here.

The prompt (``tasks/prompts.py``, ``INSTAG``) is our own wording of the paper's tagging instruction,
with one worked example of the answer format (ours; in a probe of 8 demo queries the local 135M judge
wrote JSON for none without it and for 2 with it); the tags and their explanations are a signal, paid for once per example and judge. Normalisation is a
derived result (the vocabulary and every merge), published as artifacts; a second run calls no model
and computes nothing again.

Deviations:
- The judge is any backend (``judge``); the default local 135M model rarely writes the JSON asked for.
  An answer with no readable tag list (no JSON, a refusal, a list cut off at the 512-token limit, an
  empty list) is stored as an error with its raw text and the example has no tags: it is never selected.
- The tagger sees every turn before the last answer as one query; the paper tags each query of a
  multi-turn session separately.
- Semantic aggregation embeds tags with the configured sentence encoder (all-MiniLM-L6-v2 by default),
  not PhraseBERT; the paper's t = 0.05 is read as DBSCAN's eps on the cosine distance (tags within cosine
  similarity 0.95 merge), with ``min_samples = 1``.
- Association rules are mined between two tags (the paper's FP-Growth rules may have several tags on a
  side; it does not say how those merge); merging repeats until no rule holds.
- alpha and the minimum support are counts in the paper's pool of hundreds of thousands of queries;
  on a small pool they drop nearly every tag, so scale them to the pool (they are parameters).
- Ties in tag count keep the examples in uid order (the paper does not say). The selection falls short of
  m when every example not yet chosen has no tag left (failed tagging, or every tag dropped); the paper's
  loop would not end there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import polars as pl
from prefect import flow
from pydantic import Field

from sft_select.flows.common import MethodParams, SelectionRef, finish
from sft_select.settings import settings
from sft_select.tasks.backends.chat import get_llm
from sft_select.tasks.backends.models import model_identity
from sft_select.tasks.judge import llm_signal, score_with_llm
from sft_select.tasks.prompts import INSTAG
from sft_select.tasks.report import histogram_rows, publish_markdown, publish_table
from sft_select.tasks.select import resolve_budget
from sft_select.tasks.signal_task import DatasetRef
from sft_select.tasks.tag_normalization import PAPER, Normalization, normalize_tags, raw_tags

PAPER_SHARE = round(6000 / 306044, 4)  # TagLM's 6K of the paper's 306,044-example pool


def complexity_first_diverse_sampling(tags: Mapping[str, Sequence[str]], m: int) -> pl.DataFrame:
    """The paper's Algorithm 1 over ``uid -> normalised tags``: passes over the queries sorted by tag
    count (descending; ties by uid), each pass taking a query only when it brings a tag not yet covered
    in that pass, until ``m`` are taken or no query left has a tag. Returns ``uid, score, reason`` in the
    order taken; the score is the query's complexity (its tag count)."""
    order = sorted(tags, key=lambda u: (-len(set(tags[u])), u))
    remaining = [u for u in order if tags[u]]
    chosen: list[dict] = []
    passes = 0
    while len(chosen) < m and remaining:
        passes += 1
        covered: set[str] = set()
        left = []
        for u in remaining:
            new = [t for t in dict.fromkeys(tags[u]) if t not in covered]
            if new and len(chosen) < m:
                covered.update(tags[u])
                shown = ", ".join(new[:5]) + (", ..." if len(new) > 5 else "")
                chosen.append({"uid": u, "score": float(len(set(tags[u]))),
                               "reason": f"pass {passes}: {len(set(tags[u]))} tags, {len(new)} not yet covered "
                                         f"in this pass ({shown})"})
            else:
                left.append(u)
        remaining = left
    return pl.DataFrame(chosen, schema={"uid": pl.String, "score": pl.Float64, "reason": pl.String})


class InsTagParams(MethodParams):
    budget: float | None = Field(
        PAPER_SHARE, description="How many queries to keep: a count (>= 1) or a fraction (< 1); default the "
                                 "paper's share, 6,000 of 306,044.")
    alpha: int = Field(PAPER["alpha"], ge=1, description="Frequency filter: drop tags carried by fewer than alpha "
                                                         "examples (paper: 20, for a pool of ~300K; scale it).")
    eps: float = Field(PAPER["eps"], gt=0, lt=1, description="Semantic aggregation: DBSCAN eps on the cosine "
                                                             "distance between tag embeddings (paper: t = 0.05).")
    min_support: int = Field(PAPER["min_support"], ge=1, description="Association aggregation: examples carrying "
                                                                     "both tags of a rule (paper: 40).")
    min_confidence: float = Field(PAPER["min_confidence"], gt=0, le=1,
                                  description="Association aggregation: share of the examples with one tag that "
                                              "carry the other (paper: 0.99).")
    judge: str | None = Field(
        None, description="LLM tagger: 'openai:<model>' (OPENAI_BASE_URL, any compatible server), 'local', "
                          "'local:<model folder>'; empty: the configured default (SFT_SELECT_LLM).")
    encoder: str | None = Field(None, description="Sentence encoder that embeds the tags; the configured default "
                                                  "(all-MiniLM-L6-v2) when empty.")
    batch_size: int = Field(16, ge=1, description="Queries per durable batch of tagging.")


def _vocabulary_rows(normalization: Normalization, limit: int = 200) -> list[dict]:
    rows = [{"tag": v["tag"], "examples": v["examples"], "raw tags": ", ".join(v["members"][:8])
             + (f", ... ({len(v['members'])})" if len(v["members"]) > 8 else "")}
            for v in normalization.vocabulary[:limit]]
    return rows or [{"tag": "-", "examples": 0, "raw tags": "no tag is left after normalisation"}]


@flow(name="instag", log_prints=True)
def instag(params: InsTagParams) -> SelectionRef:
    """Tag every query's intentions with an LLM, normalise the tags, then complexity-first diverse sampling."""
    dataset = DatasetRef.load(params.dataset, params.dataset_version)
    signal = llm_signal(INSTAG, get_llm(params.judge))
    encoder = model_identity(params.encoder or settings().encoder)
    params = params.model_copy(update={"judge": signal.model, "encoder": encoder})  # recorded as used

    tagged = score_with_llm(signal, dataset, batch_size=params.batch_size)
    uids = dataset.read(["uid"])["uid"]
    raw = raw_tags(signal, uids)
    vocabulary = normalize_tags(signal, dataset, params.alpha, params.eps, params.min_support, params.min_confidence,
                                encoder)
    normalization = vocabulary.read()
    tags = {u: normalization.apply(raw[u]) for u in uids if u in raw}

    m = resolve_budget(params.budget, dataset.rows)
    selection = complexity_first_diverse_sampling(tags, m)

    counts = vocabulary.counts
    publish_table("instag-vocabulary", _vocabulary_rows(normalization),
                  f"InsTag tag vocabulary of {dataset.name}@{dataset.version} ({counts['association']} tags, the 200 "
                  "most frequent)")
    publish_table("instag-merges", normalization.merges[:1000] or [{"step": "-", "tag": "-", "into": "-",
                                                                    "why": "no merge"}],
                  f"every merge of InsTag's tag normalisation ({len(normalization.merges)}; first 1,000 shown)")
    complexity = pl.Series([float(len(tags.get(u, []))) for u in uids])
    publish_table("instag-complexity", histogram_rows(complexity), "tags per query after normalisation")
    covered = {t for u in selection["uid"] for t in tags[u]}
    publish_markdown("instag-normalization", "\n".join([
        f"# InsTag tag normalisation of `{dataset.name}@{dataset.version}`", "",
        f"Tagger `{signal.model}`: {len(raw)} of {dataset.rows} queries tagged, {tagged.errors} without tags "
        "(unparseable answers are stored with their raw text).", "",
        "| step | distinct tags |", "|---|---:|",
        f"| raw | {counts['raw']} |",
        f"| frequency filter (alpha = {params.alpha}) | {counts['frequency']} |",
        f"| rule aggregation | {counts['rule']} |",
        f"| semantic aggregation (eps = {params.eps}, {encoder}) | {counts['semantic']} |",
        f"| association aggregation (support {params.min_support}, confidence {params.min_confidence}) | "
        f"{counts['association']} |", "",
        f"{len(normalization.merges)} merges; derived result `{vocabulary.key}`. The selection covers "
        f"{len(covered)} of {counts['association']} tags."]), "InsTag normalisation summary")
    print(f"instag: {selection.height} of {dataset.rows} queries kept (budget {m}); {len(raw)} tagged by "
          f"{signal.model} ({tagged.computed} now, {tagged.reused} reused, {tagged.errors} without tags); "
          f"{counts['raw']} raw tags -> {counts['association']} after normalisation; the selection covers "
          f"{len(covered)} of them")
    return finish("instag", params, dataset, selection, [tagged])
