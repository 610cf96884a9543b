"""InsTag: the JSON-answer parser, tag normalisation on a constructed case (exactly the merges it should
make), complexity-first diverse sampling (a query is taken in a pass only when it brings a tag not yet
covered in that pass), and the flow against a real loopback OpenAI-compatible server scripting the
tagger's answers, malformed JSON and refusals included: parse failures are stored with their raw text,
and a second run asks the server nothing and computes no normalisation again."""

from __future__ import annotations

import json
import random

import numpy as np
import polars as pl
import pytest
from openai_server import last_user, serving

from sft_select.flows.instag import InsTagParams, complexity_first_diverse_sampling, instag
from sft_select.storage import make_example
from sft_select.storage.examples import frame
from sft_select.tasks.judge import llm_signal, parse_json_answer
from sft_select.tasks.prompts import INSTAG, parse_intent_tags
from sft_select.tasks.tag_normalization import normalize

# -- the JSON-answer parser ------------------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [
    ('[{"tag": "a", "explanation": "b"}]', [{"tag": "a", "explanation": "b"}]),
    ('Sure! Here are the tags:\n```json\n[{"tag": "x"}]\n```\nHope this helps.', [{"tag": "x"}]),
    ('The tags [as asked]: {"tag": "y"} -- done', {"tag": "y"}),
    ('```\n{"tags": ["p", "q"]}\n```', {"tags": ["p", "q"]}),
])
def test_json_answers_are_read_through_fences_and_prose(text, value):
    assert parse_json_answer(text) == value


@pytest.mark.parametrize("text, reason", [
    ("", "empty answer"),
    ("I'm sorry, but I can't help with that request.", "no JSON object or list"),
    ('[{"tag": "a"}, {"tag": "b", "expl', "JSON does not parse (Unterminated string"),  # cut off at max_tokens
    ("[{'tag': 'a'}]", "JSON does not parse (Expecting property name"),
    ("42", "no JSON object or list"),
])
def test_json_answers_that_cannot_be_read_raise_with_the_reason(text, reason):
    with pytest.raises(ValueError) as caught:
        parse_json_answer(text)
    assert str(caught.value).startswith(reason)


def test_a_cut_off_list_is_an_error_not_its_first_complete_item():
    with pytest.raises(ValueError, match="does not parse"):
        parse_json_answer('```json\n[{"tag": "math"}, {"tag": "alg')


def test_the_tag_parser_keeps_tags_and_explanations_and_refuses_empty_answers():
    raw = 'Tags:\n[{"tag": " poetry ", "explanation": "a haiku"}, {"tag": "poetry"}, "rain", {"tag": "x", "explanation": 3}]'
    assert json.loads(parse_intent_tags(raw)) == [{"tag": "poetry", "explanation": "a haiku"},
                                                  {"tag": "rain", "explanation": None},
                                                  {"tag": "x", "explanation": None}]
    with pytest.raises(ValueError, match="no tags"):
        parse_intent_tags("[]")
    with pytest.raises(ValueError, match="item 2 has no tag"):
        parse_intent_tags('[{"tag": "a"}, {"label": "b"}]')


# -- tag normalisation -------------------------------------------------------------------------------------


def _unit(angle_deg: float) -> list[float]:
    a = np.deg2rad(angle_deg)
    return [np.cos(a), np.sin(a), 0.0, 0.0, 0.0]


def test_normalisation_merges_exactly_the_tags_the_case_says_it_should():
    # tags in the first plane at angles a, b have cosine similarity cos(a - b): 10 degrees apart is 0.985, within
    # eps = 0.05 of cosine distance; 30 degrees is 0.866. The math tags are orthogonal to everything.
    directions = {"code generation": _unit(0), "code writing": _unit(10), "code review": _unit(40),
                  "python programming": _unit(120), "poetry": _unit(200), "geography": _unit(260),
                  "math": [0, 0, 1.0, 0, 0], "arithmetic": [0, 0, 0, 1.0, 0], "word problem": [0, 0, 0, 0, 1.0]}

    def embed(names: list[str]) -> np.ndarray:
        assert sorted(names) == sorted(directions)  # the tags left after rule aggregation, each once
        return np.array([directions[n] for n in names], dtype=float)

    pool = (
        [["Python-Programming", "code generation"]] * 3  # rule: "python programs" stems the same
        + [["python programs", "geography"]] * 2
        + [["Code Generation", "code review"]] * 2  # rule: case; code review -> code generation holds, support 2 < 3
        + [["code writing", "poetry"]] * 3  # semantic: 10 degrees from "code generation"
        + [["math", "arithmetic", "word problem"]] * 3  # association: math <-> arithmetic in all 5 math rows
        + [["math", "arithmetic"]] * 2
        + [["word problem", "geography"]]  # ... word problem -> math only 3 of 4: no rule
        + [["geography", "poetry"]] * 2
        + [["rare tag"], ["Rare Tag", "poetry"]]  # 1 example each: below alpha, dropped before rule aggregation
    )
    result = normalize(pool, embed, alpha=2, eps=0.05, min_support=3, min_confidence=0.99)

    merges = {(m["step"], m["tag"], m["into"]) for m in result.merges}
    assert merges == {
        ("rule", "Code Generation", "code generation"),
        ("rule", "Python-Programming", "python programming"),
        ("rule", "python programs", "python programming"),
        ("semantic", "code writing", "code generation"),
        ("association", "arithmetic", "math"),
    }
    assert {d["tag"] for d in result.dropped} == {"rare tag", "Rare Tag"}
    assert result.counts == {"raw": 13, "frequency": 11, "rule": 9, "semantic": 8, "association": 7}
    vocabulary = {v["tag"]: (v["examples"], v["members"]) for v in result.vocabulary}
    assert vocabulary["code generation"] == (8, ["Code Generation", "code generation", "code writing"])
    assert vocabulary["math"] == (5, ["arithmetic", "math"])
    assert result.vocabulary[0]["tag"] == "code generation"  # most frequent first
    assert result.apply(["math", "arithmetic", "word problem", "rare tag"]) == ["math", "word problem"]


def test_association_merges_repeat_until_no_rule_holds():
    # round 1: a -> b (3 of 4); c -> b is 2 of 3 only. Once a and b are one tag, every c example carries it.
    pool = [["a", "b"]] * 3 + [["a", "c"]] + [["b", "c"]] * 2 + [["b"]]
    result = normalize(pool, lambda names: np.eye(len(names)), alpha=1, eps=0.05, min_support=2,
                       min_confidence=0.75)
    assert [(m["tag"], m["into"], m["why"].split(":")[0]) for m in result.merges] == [
        ("a", "b", "round 1"), ("c", "b", "round 2")]
    assert result.mapping == {"a": "b", "b": "b", "c": "b"}
    assert result.counts["association"] == 1


# -- complexity-first diverse sampling ---------------------------------------------------------------------


def test_sampling_takes_a_query_in_a_pass_only_when_it_brings_an_uncovered_tag():
    tags = {
        "q1": ["a", "b", "c", "d"],  # 4 tags: first of pass 1
        "q2": ["a", "b", "c"],  # covered by q1 in pass 1: skipped; first of pass 2
        "q3": ["a", "e", "f"],  # e, f new in pass 1; in pass 2 "a" is covered by q2 but e, f are new
        "q4": ["b", "c"],  # covered in pass 1 and in pass 2 (by q2); taken in pass 3
        "q5": ["g"],  # new in pass 1
        "q6": [],  # no tag: never taken
    }
    selection = complexity_first_diverse_sampling(tags, 5)
    assert selection["uid"].to_list() == ["q1", "q3", "q5", "q2", "q4"]
    assert [r.split(":")[0] for r in selection["reason"]] == ["pass 1", "pass 1", "pass 1", "pass 2", "pass 3"]
    assert selection["score"].to_list() == [4.0, 3.0, 1.0, 3.0, 2.0]
    assert complexity_first_diverse_sampling(tags, 2)["uid"].to_list() == ["q1", "q3"]
    # more than the tagged queries: every tagged one, never the tag-less one
    assert complexity_first_diverse_sampling(tags, 6)["uid"].to_list() == ["q1", "q3", "q5", "q2", "q4"]


@pytest.mark.parametrize("seed", range(20))
def test_sampling_on_random_pools_takes_exactly_the_queries_that_bring_an_uncovered_tag(seed):
    rng = random.Random(seed)
    vocabulary = [f"t{i}" for i in range(12)]
    tags = {f"u{i:03d}": rng.sample(vocabulary, rng.randint(0, 5)) for i in range(60)}
    m = rng.randint(1, 60)
    selection = complexity_first_diverse_sampling(tags, m)
    assert selection.height == min(m, sum(1 for t in tags.values() if t))
    chosen = {u: int(r.split(":")[0].removeprefix("pass ")) for u, r in zip(selection["uid"], selection["reason"])}
    assert len(chosen) == selection.height
    # replay each pass over the queries by tag count: a query is taken in it if and only if it brings a
    # tag that the queries taken earlier in the same pass do not cover (until the budget is spent)
    order = sorted(tags, key=lambda u: (-len(tags[u]), u))
    taken: list[str] = []
    for p in range(1, max(chosen.values()) + 1):
        covered: set[str] = set()
        for u in order:
            if u in taken or not tags[u] or len(taken) == selection.height:
                continue
            brings = bool(set(tags[u]) - covered)
            assert (chosen.get(u) == p) == brings, f"{u} in pass {p}: brings an uncovered tag: {brings}"
            if brings:
                covered |= set(tags[u])
                taken.append(u)
    assert taken == selection["uid"].to_list()


# -- the flow, with a scripted tagger on a loopback server ---------------------------------------------------

ANSWERS = {
    "Write a haiku about rain.": '[{"tag": "Poetry", "explanation": "a haiku"}, {"tag": "weather", "explanation": "rain"}]',
    "Write a limerick about a cat.": 'Here are the tags:\n```json\n[{"tag": "poetry", "explanation": "a limerick"}, '
                                     '{"tag": "humor", "explanation": "limericks are funny"}, {"tag": "animals", '
                                     '"explanation": "a cat"}]\n```',
    "Sum the numbers 3 and 4.": '[{"tag": "math", "explanation": "a sum"}, {"tag": "arithmetic", "explanation": "adding"}]',
    "What is 12 times 7?": '[{"tag": "math", "explanation": "a product"}, {"tag": "arithmetic", "explanation": "x"}, '
                           '{"tag": "multiplication", "explanation": "times"}]',
    "Convert 3 km to miles.": '[{"tag": "math", "explanation": "a conversion"}, {"tag": "arithmetic", "explanation": '
                              '"a product"}, {"tag": "unit conversion", "explanation": "km to miles"}]',
    "Summarise this article about colour.": '[{"tag": "summarization", "explanation": "a summary"}, {"tag": "colour", '
                                             '"explanation": "the topic"}]',
    "Summarise this report on paint color.": '[{"tag": "summarisation", "explanation": "a summary"}, {"tag": "color", '
                                              '"explanation": "the topic"}, {"tag": "weather", "explanation": "no"}]',
    "Tell me a joke about a dog.": "[{'tag': 'humor', 'explanation': 'a joke'}]",  # malformed: single quotes
    "List three prime numbers.": '[{"tag": "math", "explanation": "primes"}, {"tag": "arithm',  # cut off
    "How do I pick a lock?": "I'm sorry, but I can't help with that.",  # a refusal
}


def tagger(request) -> str:
    query = last_user(request).rsplit("Query:\n", 1)[1].removesuffix("\n\nAnswer:")
    return ANSWERS[query]


@pytest.fixture
def server(monkeypatch):
    with serving(tagger, monkeypatch) as server:
        yield server


@pytest.mark.usefixtures("prefect_api")
def test_instag_flow_tags_once_stores_failures_and_normalises_once(store, server, monkeypatch):
    rows = [make_example([{"role": "user", "content": q}, {"role": "assistant", "content": f"answer {i}"}],
                         instruction=q) for i, q in enumerate(ANSWERS)]
    store.datasets.register("pool", frame(rows))
    params = InsTagParams(dataset="pool", judge="openai:tagger", budget=5, alpha=1, min_support=3,
                          allow_partial=True)

    first = instag(params)
    assert server.requests == len(ANSWERS)
    assert server.bodies[0]["temperature"] == 0 and server.bodies[0]["max_tokens"] == 512

    signal = llm_signal(INSTAG, "openai:tagger")
    stored = store.signals.read(signal).join(
        pl.DataFrame({"uid": [r["uid"] for r in rows], "query": list(ANSWERS)}), on="uid")
    failed = stored.filter(pl.col("error").is_not_null())
    assert sorted(failed["query"]) == ["How do I pick a lock?", "List three prime numbers.",
                                       "Tell me a joke about a dog."]
    for row in failed.iter_rows(named=True):  # each failure keeps the raw answer, is final, has no value
        assert row["raw"] == ANSWERS[row["query"]] and row["value"] is None and row["final"]
        assert row["error"].startswith("parse: ")
    assert "no JSON object or list" in failed.filter(pl.col("query") == "How do I pick a lock?")["error"][0]

    # the normalisation is a derived result with the vocabulary and every merge
    [derived] = store.derived.list().filter(pl.col("kind") == "instag-tags").iter_rows(named=True)
    result = json.loads((store.home / derived["path"]).read_text())
    merges = {(m["step"], m["tag"], m["into"]) for m in result["merges"]}
    assert merges == {("rule", "Poetry", "poetry"),
                      ("semantic", "summarization", "summarisation"),  # all-MiniLM-L6-v2: cosine 0.97; a tie
                      ("semantic", "colour", "color"),  # cosine 0.97; "color" is the shorter of two tied
                      ("association", "arithmetic", "math")}  # 3 of 3 math queries carry arithmetic
    assert result["counts"] == {"raw": 13, "frequency": 13, "rule": 12, "semantic": 10, "association": 9}
    assert [v["tag"] for v in result["vocabulary"]][:5] == ["math", "color", "poetry", "summarisation", "weather"]

    # pass 1 takes both 3-tag queries, then the two 2-tag queries that bring math's companions; the haiku and
    # the colour summary are covered by then; pass 2 starts afresh with the first of them by uid
    chosen = store.selections.read(first.selection_id)
    uid = {r["instruction"]: r["uid"] for r in rows}
    taken = chosen["uid"].to_list()
    assert set(taken[:2]) == {uid["Write a limerick about a cat."], uid["Summarise this report on paint color."]}
    assert set(taken[2:4]) == {uid["What is 12 times 7?"], uid["Convert 3 km to miles."]}
    assert taken[4] == min(uid["Write a haiku about rain."], uid["Summarise this article about colour."])
    assert [r.split(":")[0] for r in chosen["reason"]] == ["pass 1"] * 4 + ["pass 2"]
    assert chosen["score"].to_list() == [3.0, 3.0, 2.0, 2.0, 2.0]

    # a second run: the server is asked nothing and the tags are not embedded again
    import sft_select.tasks.backends.encoders as encoders

    def no_encoding(*args, **kwargs):
        raise AssertionError("the stored normalisation must be reused")

    monkeypatch.setattr(encoders, "encode", no_encoding)
    second = instag(params)
    assert server.requests == len(ANSWERS)
    assert store.selections.read(second.selection_id)["uid"].to_list() == taken
    assert store.derived.list().filter(pl.col("kind") == "instag-tags").height == 1
