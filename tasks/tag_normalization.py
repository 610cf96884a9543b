"""InsTag's tag normalisation (Lu et al. 2023, "#InsTag: Instruction Tagging for Analyzing Supervised
Fine-tuning of Large Language Models", section 2.2): open-set tags from an LLM are noisy (one intention
spelled many ways, tags of every granularity, tags that always come together), so the raw tags of a pool
go through four steps, in this order:

1. Frequency filtering: drop the long tail, tags that occur fewer than ``alpha`` times in the pool
   (paper: alpha = 20; it depends on the pool's size).
2. Rule aggregation: lowercase, every character that is not a letter or digit becomes a space, and every
   word is stemmed (the paper: NLTK; here NLTK's Porter stemmer); tags equal after that are one tag.
3. Semantic aggregation: embed the tags (the paper: PhraseBERT), cluster them with DBSCAN at a
   semantic-similarity threshold ``t`` (paper: 0.05) and merge each cluster into one tag.
4. Association aggregation: tags that nearly always occur together are one tag. The paper mines
   association rules with FP-Growth (minimum support 40, minimum confidence 99%) and merges the tags of
   each rule, recursively.

The result is the tag vocabulary (each normalised tag, how many examples carry it, the raw tags it
stands for) and every merge made (step, tag, the tag it became, why). :func:`normalize` is the plain
function; :data:`normalize_tags` is the Prefect task that stores the result as a derived result keyed
by the content of the tags it was computed from (and the parameters), so a second run computes nothing.

Reading the paper's numbers: ``t`` = 0.05 is DBSCAN's ``eps`` on the cosine *distance* (1 - cosine
similarity), so tags merge when their embeddings have a cosine similarity of at least 0.95; the paper's
step merged 7,157 tags into 6,587, which only a tight threshold does (a similarity of 0.05 would merge
nearly everything). DBSCAN runs with ``min_samples = 1`` (the paper does not give it): every tag is a core
point, so a cluster is a chain of tags each within ``eps`` of the next, and a tag with no neighbour stays
as it is. Association rules are mined between two tags: a rule ``a -> b`` holds when at least
``min_support`` examples carry both and at least ``min_confidence`` of the examples carrying ``a`` carry
``b`` too (these are the two-tag rules FP-Growth finds at that support and confidence; the paper does not
say how a rule with several tags on one side would merge, so none is mined). The tags of every rule are
merged (transitively), the counts recomputed on the merged tags, and the mining repeated until no rule
holds: our reading of "recursively".

Each merged group is named by its member carried by the most examples (then the shorter, then the first
alphabetically); rule groups are named by that member's lowercased, symbol-free form, not its stem, so the
vocabulary stays readable.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import polars as pl
from prefect import task
from prefect.context import TaskRunContext
from pydantic import BaseModel

from sft_select.storage import Signal
from sft_select.storage.signals import canonical_json
from sft_select.tasks.derived import derived_cache_key
from sft_select.tasks.signal_task import DatasetRef, get_store

VERSION = "1"
KIND = "instag-tags"
PAPER = {"alpha": 20, "eps": 0.05, "min_support": 40, "min_confidence": 0.99}


@dataclass
class Normalization:
    """The result of :func:`normalize`: ``mapping`` takes every raw tag that survived the frequency
    filter to its normalised tag; ``vocabulary`` lists the normalised tags (``tag``, ``examples``,
    ``members``: the raw tags it stands for), most frequent first; ``merges`` every merge made (``step``,
    ``tag``, ``into``, ``why``); ``dropped`` the raw tags the frequency filter removed (``tag``,
    ``examples``); ``counts`` the number of distinct tags after each step."""

    mapping: dict[str, str]
    vocabulary: list[dict[str, Any]]
    merges: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def apply(self, tags: Iterable[str]) -> list[str]:
        """An example's normalised tags: its raw tags mapped, dropped ones left out, each once, in order."""
        return list(dict.fromkeys(self.mapping[t] for t in tags if t in self.mapping))


# -- the four steps --------------------------------------------------------------------------------------


def clean(tag: str) -> str:
    """Lowercase, every character that is not a letter or a digit a space, spaces collapsed."""
    return " ".join(re.sub(r"[\W_]+", " ", tag.lower()).split())


@lru_cache(maxsize=1)
def _stemmer():
    from nltk.stem import PorterStemmer

    return PorterStemmer()


def stemmer_identity() -> str:
    """Names the stemmer (and its version) in the result's key: another stemmer may group otherwise."""
    import nltk

    return f"nltk-porter-{nltk.__version__}"


def rule_key(tag: str) -> str:
    """What rule aggregation compares: the cleaned tag with every word stemmed."""
    stem = _stemmer().stem
    return " ".join(stem(word) for word in clean(tag).split())


def _representative(members: Iterable[str], examples: Mapping[str, int]) -> str:
    """The member carried by the most examples; then the shorter; then the first alphabetically."""
    return min(members, key=lambda t: (-examples[t], len(t), t))


def frequency_filter(examples: Mapping[str, int], alpha: int) -> tuple[set[str], list[dict[str, Any]]]:
    """Step 1: the tags carried by at least ``alpha`` examples, and the dropped ones with their counts."""
    kept = {t for t, n in examples.items() if n >= alpha}
    dropped = sorted(({"tag": t, "examples": n} for t, n in examples.items() if n < alpha),
                     key=lambda d: (-d["examples"], d["tag"]))
    return kept, dropped


def _grouped(groups: Iterable[list[str]], examples: Mapping[str, int]) -> dict[str, str]:
    """Member -> the group's representative, for every member of every group."""
    return {m: rep for g in groups for rep in [_representative(g, examples)] for m in g}


def rule_aggregation(tags: Iterable[str], examples: Mapping[str, int]) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Step 2: raw tag -> its rule group's name (the cleaned form of the group's most frequent member),
    and the merges (every tag of a group of several that is not spelled as the group's name)."""
    groups: dict[str, list[str]] = {}
    for t in tags:
        groups.setdefault(rule_key(t), []).append(t)
    mapping, merges = {}, []
    for key, members in sorted(groups.items()):
        name = clean(_representative(members, examples))
        for t in sorted(members):
            mapping[t] = name
            if len(members) > 1 and t != name:
                merges.append({"step": "rule", "tag": t, "into": name,
                               "why": f"same after lowercasing, symbols to spaces and stemming: {key!r}"})
    return mapping, merges


def semantic_aggregation(names: Sequence[str], examples: Mapping[str, int], vectors: np.ndarray,
                         eps: float, min_samples: int = 1) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Step 3: DBSCAN over the tags' embeddings with the cosine distance (``1 - cos``) and ``eps``;
    every cluster becomes its most frequent member. Tags DBSCAN leaves as noise stay as they are."""
    from sklearn.cluster import DBSCAN

    if len(names) < 2:
        return {n: n for n in names}, []
    x = np.asarray(vectors, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    labels = DBSCAN(eps=eps, min_samples=min_samples, metric="cosine").fit_predict(x)
    clusters: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        clusters.setdefault(int(label) if label >= 0 else -1 - i, []).append(i)
    mapping, merges = {}, []
    for rows in clusters.values():
        r = min(rows, key=lambda i: (-examples[names[i]], len(names[i]), names[i]))  # the representative
        rep = names[r]
        for i in sorted(rows, key=lambda i: names[i]):
            mapping[names[i]] = rep
            if names[i] != rep:
                merges.append({"step": "semantic", "tag": names[i], "into": rep,
                               "why": f"DBSCAN cluster of {len(rows)} (eps {eps} on cosine distance); "
                                      f"cosine similarity to {rep!r}: {float(x[i] @ x[r]):.3f}"})
    return mapping, merges


def association_rules(transactions: Sequence[Sequence[str]], min_support: int,
                      min_confidence: float) -> list[dict[str, Any]]:
    """The rules ``a -> b`` between two tags: at least ``min_support`` examples carry both, and at least
    ``min_confidence`` of the examples carrying ``a`` carry ``b``. Each with its support and confidence."""
    pairs = pl.DataFrame({"row": list(range(len(transactions))), "tag": [sorted(set(t)) for t in transactions]},
                         schema={"row": pl.Int64, "tag": pl.List(pl.String)}).explode("tag").drop_nulls()
    if pairs.is_empty():
        return []
    carried = dict(pairs.group_by("tag").len("n").iter_rows())
    both = (pairs.join(pairs, on="row", suffix="_b").filter(pl.col("tag") < pl.col("tag_b"))
            .group_by("tag", "tag_b").len("support").filter(pl.col("support") >= min_support))
    rules = []
    for a, b, support in both.iter_rows():
        for x, y in ((a, b), (b, a)):
            if support / carried[x] >= min_confidence:
                rules.append({"from": x, "to": y, "support": int(support), "confidence": support / carried[x]})
    return sorted(rules, key=lambda r: (r["from"], r["to"]))


def association_aggregation(transactions: Sequence[Sequence[str]], min_support: int, min_confidence: float
                            ) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Step 4: merge the tags of every :func:`association_rules` rule (transitively) into the group's most
    frequent member; recount on the merged tags and mine again until no rule holds. Returns tag -> merged
    tag for the tags merged, and the merges (with the round and the rule that caused each)."""
    mapping: dict[str, str] = {}
    merges: list[dict[str, Any]] = []
    current = [list(dict.fromkeys(t)) for t in transactions]
    for round_ in itertools.count(1):
        rules = association_rules(current, min_support, min_confidence)
        if not rules:
            break
        parent: dict[str, str] = {}

        def find(t: str) -> str:
            while parent.get(t, t) != t:
                t = parent[t]
            return t

        for r in rules:
            a, b = find(r["from"]), find(r["to"])
            if a != b:
                parent[max(a, b)] = min(a, b)
        examples = Counter(t for tags in current for t in tags)
        groups: dict[str, list[str]] = {}
        for t in {t for r in rules for t in (r["from"], r["to"])}:
            groups.setdefault(find(t), []).append(t)
        step = _grouped(groups.values(), examples)
        why = {r["from"]: r for r in rules}
        for t, rep in sorted(step.items()):
            if t != rep:
                r = why.get(t) or next(r for r in rules if r["to"] == t)
                merges.append({"step": "association", "tag": t, "into": rep,
                               "why": f"round {round_}: rule {r['from']!r} -> {r['to']!r}, support {r['support']}, "
                                      f"confidence {r['confidence']:.3f}"})
        for t, rep in list(mapping.items()):
            mapping[t] = step.get(rep, rep)
        mapping.update({t: rep for t, rep in step.items() if t != rep})
        current = [list(dict.fromkeys(step.get(t, t) for t in tags)) for tags in current]
    return mapping, merges


def normalize(tag_lists: Sequence[Sequence[str]], embed: Callable[[list[str]], np.ndarray], *,
              alpha: int = PAPER["alpha"], eps: float = PAPER["eps"], min_support: int = PAPER["min_support"],
              min_confidence: float = PAPER["min_confidence"]) -> Normalization:
    """The four steps over the raw tags of a pool (one list per example); ``embed(tags)`` gives the
    tags' vectors for semantic aggregation (called once, only when two or more tags remain)."""
    raw = [list(dict.fromkeys(tags)) for tags in tag_lists]
    examples = Counter(t for tags in raw for t in tags)
    counts = {"raw": len(examples)}

    kept, dropped = frequency_filter(examples, alpha)
    counts["frequency"] = len(kept)

    rule, merges = rule_aggregation(sorted(kept), examples)
    after_rule = Counter(t for tags in raw for t in dict.fromkeys(rule[x] for x in tags if x in rule))
    names = sorted(after_rule)
    counts["rule"] = len(names)

    vectors = embed(names) if len(names) > 1 else np.zeros((len(names), 1))
    semantic, semantic_merges = semantic_aggregation(names, after_rule, vectors, eps)
    merges += semantic_merges
    mapping = {t: semantic[rule[t]] for t in rule}
    counts["semantic"] = len(set(mapping.values()))

    transactions = [list(dict.fromkeys(mapping[t] for t in tags if t in mapping)) for tags in raw]
    association, association_merges = association_aggregation(transactions, min_support, min_confidence)
    merges += association_merges
    mapping = {t: association.get(m, m) for t, m in mapping.items()}
    counts["association"] = len(set(mapping.values()))

    carried = Counter(t for tags in raw for t in dict.fromkeys(mapping[x] for x in tags if x in mapping))
    members: dict[str, list[str]] = {}
    for t, m in sorted(mapping.items()):
        members.setdefault(m, []).append(t)
    vocabulary = [{"tag": t, "examples": n, "members": members[t]}
                  for t, n in sorted(carried.items(), key=lambda kv: (-kv[1], kv[0]))]
    return Normalization(mapping=mapping, vocabulary=vocabulary, merges=merges, dropped=dropped, counts=counts)


# -- the stored task -------------------------------------------------------------------------------------


def raw_tags(signal: Signal, uids: Sequence[str]) -> dict[str, list[str]]:
    """uid -> the raw tags of a filled tagging signal (kind ``json``: a list of ``{"tag", "explanation"}``);
    examples whose tagging failed are left out."""
    values = get_store().signals.values(signal, uids, alias="tags").drop_nulls("tags")
    return {u: [item["tag"] for item in json.loads(v)] for u, v in values.iter_rows()}


def _inputs(signal: Signal, dataset: DatasetRef, alpha: int, eps: float, min_support: int, min_confidence: float,
            encoder: str) -> dict[str, Any]:
    """What a normalisation depends on, as content: the tags themselves (a hash of every example's
    uid and tag answer), the signal, the dataset, the parameters, the encoder and the stemmer."""
    uids = dataset.read(["uid"])["uid"].sort()
    values = get_store().signals.values(signal, uids, alias="tags").drop_nulls("tags")
    digest = hashlib.sha256(canonical_json(values.rows()).encode()).hexdigest()[:32]
    return {"signal": signal.id, "dataset": dataset.fingerprint, "tags": digest, "alpha": alpha, "eps": eps,
            "min_samples": 1, "min_support": min_support, "min_confidence": min_confidence, "encoder": encoder,
            "stemmer": stemmer_identity()}


class TagVocabulary(BaseModel):
    """A stored normalisation (``path`` is JSON under the store's home): the counts after each step and
    how many merges were made; :meth:`read` gives the :class:`Normalization`."""

    signal_id: str
    fingerprint: str
    key: str
    path: str
    counts: dict[str, int]
    merges: int
    tagged: int

    def read(self) -> Normalization:
        data = json.loads((get_store().home / self.path).read_text(encoding="utf-8"))
        return Normalization(**{k: data[k] for k in ("mapping", "vocabulary", "merges", "dropped", "counts")})


def _key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    return derived_cache_key(KIND, _inputs(**parameters), version=VERSION, fmt="json")


@task(name="instag-normalize-tags", cache_key_fn=_key, persist_result=True, result_serializer="json")
def normalize_tags(signal: Signal, dataset: DatasetRef, alpha: int, eps: float, min_support: int,
                   min_confidence: float, encoder: str) -> TagVocabulary:
    """InsTag's tag normalisation of the dataset's tags (:func:`normalize`), a derived result keyed by
    the content of the tags: stored once, and read back (no embedding, no clustering) on a later run.
    ``encoder`` is the sentence encoder that embeds the tags (its model identity)."""
    from sft_select.tasks.backends.encoders import encode

    inputs = _inputs(signal, dataset, alpha, eps, min_support, min_confidence, encoder)

    def compute() -> dict[str, Any]:
        tags = raw_tags(signal, dataset.read(["uid"])["uid"].sort())
        result = normalize(list(tags.values()), lambda names: encode(names, encoder, max_tokens=32), alpha=alpha,
                           eps=eps, min_support=min_support, min_confidence=min_confidence)
        return {**asdict(result), "tagged": len(tags)}

    found = get_store().derived.get_or_compute(KIND, inputs, compute, version=VERSION, fmt="json")
    data = found.read()
    return TagVocabulary(signal_id=signal.id, fingerprint=dataset.fingerprint, key=found.key,
                         path=str(found.path.relative_to(get_store().home)), counts=data["counts"],
                         merges=len(data["merges"]), tagged=data["tagged"])
