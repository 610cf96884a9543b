"""DEITA: the expected 1-6 scores are read from the log-probabilities a real (loopback) OpenAI-compatible
server returns, the evol score sums complexity x quality over the turns of a conversation, the repr
filter is the brute-force walk and never keeps two examples closer than tau, and a second run asks
the server nothing."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from openai_server import last_user, serving

from sft_select.flows.deita import PAPER_SHARE, DeitaParams, deita, evol_scores
from sft_select.storage import make_example
from sft_select.storage.examples import exchanges, frame
from sft_select.tasks.backends.chat import LocalChat
from sft_select.tasks.cluster import nearest_neighbour_filter, repr_filter, unit_rows
from sft_select.tasks.embed import embed_signal, load_vectors
from sft_select.tasks.judge import llm_signal
from sft_select.tasks.prompts import DEITA

# -- the repr filter and distilabel's rule, against brute force ------------------------------------------


def brute_force_walk(x: np.ndarray, order, m: int, tau: float) -> list[int]:
    """The paper's rule, one example at a time in float64."""
    u = [v / np.linalg.norm(v) for v in x.astype(np.float64)]
    chosen: list[int] = []
    for i in order:
        if all(float(np.dot(u[i], u[s])) <= tau for s in chosen):
            chosen.append(int(i))
        if len(chosen) == m:
            break
    return chosen


def brute_force_nearest(x: np.ndarray, order, m: int, min_distance: float) -> list[int]:
    u = [v / np.linalg.norm(v) for v in x.astype(np.float64)]
    far = [i for i in order
           if min(1 - float(np.dot(u[i], u[j])) for j in range(len(u)) if j != i) >= min_distance]
    return [int(i) for i in far[:m]]


def clustered(n: int, d: int, centres: int, spread: float, seed: int) -> np.ndarray:
    """Points around a few centres: many pairs above any tau, many below."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d))
    return (c[rng.integers(centres, size=n)] + spread * rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tau", [0.5, 0.9, 0.97])
@pytest.mark.parametrize("block", [1, 7, 256])
def test_repr_filter_is_the_brute_force_walk_and_keeps_nothing_closer_than_tau(seed, tau, block):
    x = clustered(300, 16, centres=12, spread=0.3, seed=seed)
    order = np.random.default_rng(seed + 100).permutation(len(x))
    m = 40
    chosen, similarity = repr_filter(x, order, m, tau, block=block)
    assert chosen.tolist() == brute_force_walk(x, order, m, tau)
    u = unit_rows(x[chosen])
    cos = u @ u.T
    np.fill_diagonal(cos, -np.inf)
    assert cos.max() <= tau  # no two accepted examples are closer than tau
    # each accepted example's recorded similarity is its largest cosine to those accepted before it
    assert np.isnan(similarity[0])
    assert np.allclose(similarity[1:], [cos[k, :k].max() for k in range(1, len(chosen))])
    rejected = set(order[: order.tolist().index(chosen[-1])].tolist()) - set(chosen.tolist())
    assert all((unit_rows(x[[r]]) @ u.T).max() > tau for r in rejected)  # every skip had a reason


def test_repr_filter_stops_at_m_or_when_the_order_runs_out():
    x = clustered(100, 8, centres=3, spread=0.05, seed=1)  # three tight clusters: three examples survive 0.9
    order = np.arange(100)
    assert len(repr_filter(x, order, 2, 0.9)[0]) == 2
    chosen, _ = repr_filter(x, order, 50, 0.9)
    assert len(chosen) == 3 and chosen.tolist() == brute_force_walk(x, order, 50, 0.9)
    assert repr_filter(x, order[:0], 5, 0.9)[0].tolist() == []
    with pytest.raises(ValueError, match="distinct row indices"):
        repr_filter(x, [0, 0, 1], 5, 0.9)


def test_distilabel_rule_is_a_named_variant_with_another_outcome():
    x = clustered(120, 8, centres=40, spread=0.2, seed=2)
    order = np.random.default_rng(3).permutation(len(x))
    kept, distance = nearest_neighbour_filter(x, order, 30, 0.1)
    assert kept.tolist() == brute_force_nearest(x, order, 30, 0.1)
    assert (distance >= 0.1).all()

    # two near-duplicates at the top: the repr filter keeps the first, distilabel's rule keeps neither
    pair = np.array([[1.0, 0.0, 0.0], [0.999, 0.04, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    assert repr_filter(pair, [0, 1, 2, 3], 4, 0.9)[0].tolist() == [0, 2, 3]
    assert nearest_neighbour_filter(pair, [0, 1, 2, 3], 4, 0.9)[0].tolist() == [2, 3]


# -- exchanges and the evol score --------------------------------------------------------------------


def conversation(*turns: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return make_example(messages)


def test_exchanges_split_conversations_and_a_single_turn_example_is_its_own_exchange():
    single = make_example([{"role": "user", "content": "Name a fruit.\n\nred"},
                           {"role": "assistant", "content": "An apple."}], instruction="Name a fruit.", input="red")
    chat = conversation("Hi", "Hello!", "Name a fruit.\n\nred", "An apple.", "And a blue one?", system="Be brief.")
    turns = exchanges(frame([single, chat]))
    assert turns["uid"][0] == single["uid"]  # the same content id: its scores are the example's
    mine = turns.filter(turns["example"] == chat["uid"])
    assert mine["turn"].to_list() == [0, 1, 2]
    assert mine["instruction"].to_list() == ["Hi", "Name a fruit.\n\nred", "And a blue one?"]
    assert mine["output"].to_list() == ["Hello!", "An apple.", ""]  # a last question without an answer
    assert mine["uid"][1] == single["uid"]  # the same exchange inside a conversation: one content id
    assert all(m[0]["role"] == "user" for m in mine["messages"].to_list())  # the system turn is not scored


# -- the flow against a loopback server ------------------------------------------------------------------

DISTRACTORS = {"The": math.log(0.2), "\n": math.log(0.1)}  # mass outside the labels, left out by renormalising


def label_logprobs(centre: float) -> dict[str, float]:
    """The first position's top log-probs: a bump over "1".."6" around ``centre`` (carrying 70% of the
    mass; " 4" carries part of 4's, as servers split a label's spellings) and two other tokens."""
    weights = {k: math.exp(-((k - centre) ** 2)) for k in range(1, 7)}
    total = sum(weights.values())
    top = {str(k): math.log(0.7 * w / total) for k, w in weights.items()}
    top["4"], top[" 4"] = top["4"] + math.log(0.6), top["4"] + math.log(0.4)
    return {**top, **DISTRACTORS}


def expected_from(top: dict[str, float]) -> float:
    """sum_i i * p_i over the label probabilities, normalised over the labels (spellings pooled)."""
    p = {k: sum(math.exp(lp) for t, lp in top.items() if t.strip() == str(k)) for k in range(1, 7)}
    return sum(k * v for k, v in p.items()) / sum(p.values())


def centre_of(text: str, word: str) -> float:
    i = int(re.search(rf"{word} (\d+)", text).group(1)) % 20  # Task i and its near-duplicate i + 20 score alike
    return 1 + (i * 7 % 11) / 2  # 1.0 .. 6.0, in no particular order


def scripted(request) -> dict:
    """Complexity from the number after "Task", quality from the number after "answer"; "answer 99"
    gets no label among its top tokens (a parse failure)."""
    text = last_user(request)
    if "answer 99" in text:
        return {"text": "The", "top_logprobs": [DISTRACTORS]}
    quality = "Response" in text
    top = label_logprobs(centre_of(text, "answer" if quality else "Task"))
    return {"text": "3", "top_logprobs": [top]}


@pytest.fixture
def server(monkeypatch):
    with serving(scripted, monkeypatch) as server:
        yield server


TOPICS = ["the water cycle", "a binary search", "photosynthesis", "the French revolution", "tax brackets",
          "sourdough bread", "black holes", "the offside rule", "compound interest", "jazz harmony"]
UNIQUE = ["volcanoes", "the stock market", "knitting"]


def pool_rows() -> list[dict]:
    rows = [make_example([{"role": "user", "content": f"Task {i}: explain {t}."},
                          {"role": "assistant", "content": f"answer {i}: {t} explained."}])
            for i, t in enumerate(TOPICS)]
    # a near-duplicate of every example: only the task number differs
    rows += [make_example([{"role": "user", "content": f"Task {i + 20}: explain {t}."},
                           {"role": "assistant", "content": f"answer {i + 20}: {t} explained."}])
             for i, t in enumerate(TOPICS)]
    # three without a near-duplicate
    rows += [make_example([{"role": "user", "content": f"Task {i + 40}: explain {t}."},
                           {"role": "assistant", "content": f"answer {i + 40}: {t} explained."}])
             for i, t in enumerate(UNIQUE)]
    rows.append(make_example([{"role": "user", "content": "Task 5: say nothing."},
                              {"role": "assistant", "content": "answer 99"}]))
    return rows


@pytest.mark.usefixtures("prefect_api")
def test_deita_reads_expected_scores_walks_the_repr_filter_and_reuses_everything(store, server):
    rows = pool_rows()
    store.datasets.register("pool", frame(rows))
    params = DeitaParams(dataset="pool", judge="openai:judge-deita", budget=8, pooling="sentence")
    ref = deita(params)
    assert server.requests == 2 * len(rows)  # one complexity and one quality call per exchange

    body = server.bodies[0]
    assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 20
    complexity = llm_signal(DEITA["complexity", "rubric"], "openai:judge-deita")
    quality = llm_signal(DEITA["quality", "rubric"], "openai:judge-deita")
    uids = [r["uid"] for r in rows]
    c = dict(store.signals.values(complexity, uids, alias="v").iter_rows())
    q = dict(store.signals.values(quality, uids, alias="v").iter_rows())
    for r in rows[:-1]:  # the expected score is sum_i i * p_i over the normalised label probabilities sent
        user, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        assert c[r["uid"]] == pytest.approx(expected_from(label_logprobs(centre_of(user, "Task"))), abs=1e-9)
        assert q[r["uid"]] == pytest.approx(expected_from(label_logprobs(centre_of(answer, "answer"))), abs=1e-9)
    failed = store.signals.read(quality, [rows[-1]["uid"]]).row(0, named=True)
    assert failed["value"] is None and failed["error"].startswith("parse:") and "top_logprobs" in failed["raw"]

    # evol = c x q; the selection is the repr-filter walk of the evol ranking over the stored embeddings
    evol = {u: c[u] * q[u] for u in uids[:-1]}
    ranking = sorted(evol, key=lambda u: (-evol[u], u))
    embedding = embed_signal(None, field="full", max_tokens=256, pooling="sentence")
    have, x = load_vectors(embedding, ranking)
    assert have == ranking
    selection = store.selections.read(ref.selection_id)
    assert selection["uid"].to_list() == [ranking[i] for i in brute_force_walk(x, range(len(ranking)), 8, 0.9)]
    assert selection["score"].to_list() == pytest.approx([evol[u] for u in selection["uid"]])
    assert selection.height == 8
    skipped = set(ranking[: ranking.index(selection["uid"][-1])]) - set(selection["uid"])
    assert skipped, "the pool's near-duplicates must make the filter skip some"
    assert rows[-1]["uid"] not in selection["uid"].to_list()
    assert "over 1 turn, rank 1" in selection["reason"][0]
    recorded = json.loads(store.catalog.query("SELECT params FROM selections WHERE selection_id = ?",
                                              [ref.selection_id]).item())
    assert recorded["judge"].startswith("openai:judge-deita@") and recorded["tau"] == 0.9

    again = deita(params)  # a second run: every score and embedding is stored, the walk too
    assert server.requests == 2 * len(rows)
    assert store.selections.read(again.selection_id)["uid"].to_list() == selection["uid"].to_list()

    # distilabel's rule drops both of every near-duplicate pair: only the three without one are left
    nearest = deita(params.model_copy(update={"diversity": "distilabel", "nn_distance": 0.3, "allow_partial": True}))
    assert server.requests == 2 * len(rows)  # the variant reuses every score
    kept = store.selections.read(nearest.selection_id)
    assert kept["uid"].to_list() == [u for u in ranking if u in {r["uid"] for r in rows[20:23]}]
    assert kept["reason"][0].endswith(">= 0.3")


@pytest.mark.usefixtures("prefect_api")
def test_the_evol_score_sums_complexity_times_quality_over_turns(store, server):
    chat = conversation("Task 1: plan a trip.", "answer 1: a plan.", "Task 2: add a budget.", "answer 2: a budget.",
                        "Task 3: add a museum.", "answer 3: the Louvre.")
    single = make_example([{"role": "user", "content": "Task 2: add a budget."},
                           {"role": "assistant", "content": "answer 2: a budget."}])  # chat's second exchange
    other = make_example([{"role": "user", "content": "Task 4: sing."}, {"role": "assistant", "content": "answer 4"}])
    store.datasets.register("chats", frame([chat, single, other]))
    ref = deita(DeitaParams(dataset="chats", judge="openai:judge-turns", budget=3, tau=1.0, pooling="sentence"))
    assert server.requests == 2 * 4  # four distinct exchanges: the shared one is scored once

    def score(i: int) -> float:
        return (expected_from(label_logprobs(1 + (i * 7 % 11) / 2)) ** 2)  # c and q share their centre here

    complexity = llm_signal(DEITA["complexity", "rubric"], "openai:judge-turns")
    quality = llm_signal(DEITA["quality", "rubric"], "openai:judge-turns")
    evol = dict(evol_scores(frame([chat, single, other]), complexity, quality).select("uid", "score").iter_rows())
    assert evol[chat["uid"]] == pytest.approx(score(1) + score(2) + score(3))
    assert evol[single["uid"]] == pytest.approx(score(2)) and evol[other["uid"]] == pytest.approx(score(4))
    selection = store.selections.read(ref.selection_id)
    assert selection.filter(selection["uid"] == chat["uid"])["reason"].item().startswith(
        f"evol score {evol[chat['uid']]:.4f} over 3 turns")


@pytest.mark.usefixtures("prefect_api")
def test_the_scorer_prompts_are_the_released_scorers_input_format(store, server):
    row = make_example([{"role": "user", "content": "Task 3: add 2 and 2."}, {"role": "assistant", "content": "answer 3: 4"}])
    store.datasets.register("one", frame([row]))
    deita(DeitaParams(dataset="one", judge="openai:deita-complexity-scorer", quality_judge="openai:deita-quality-scorer",
                      prompts="scorer", budget=1, pooling="sentence"))
    sent = {b["model"]: b["messages"] for b in server.bodies}
    assert sent["deita-complexity-scorer"] == [{"role": "user", "content": (
        "You are a helpful assistant. Please identify the complexity score of the following user query. \n"
        "##Query: Task 3: add 2 and 2.  \n##Complexity: ")}]
    assert sent["deita-quality-scorer"] == [{"role": "user", "content": (
        "You are a helpful assistant. Please identify the quality score of the Response corresponding to the "
        "Question. \n #Question#:\nTask 3: add 2 and 2.\n#Response#:\nanswer 3: 4 \n##Quality: ")}]


def test_a_local_model_without_a_chat_template_takes_the_scorer_prompt_raw():
    from transformers import AutoTokenizer

    from sft_select.tasks.backends.models import causal_lm_path

    tokenizer = AutoTokenizer.from_pretrained(causal_lm_path("smollm2-135m-instruct"))
    prompt = DEITA["complexity", "scorer"].conversation(prompt="Add 2 and 2.")
    templated = LocalChat.encode(tokenizer, prompt)
    assert tokenizer.decode(templated).startswith("<|im_start|>")  # a chat model: its template
    tokenizer.chat_template = None  # a scorer fine-tuned on raw text: the text as it is, with its start token
    assert LocalChat.encode(tokenizer, prompt) == tokenizer(prompt[0]["content"])["input_ids"]
    with pytest.raises(ValueError, match="no chat template"):
        LocalChat.encode(tokenizer, DEITA["complexity", "rubric"].conversation(prompt="Add 2 and 2."))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    from tiny_lm import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def test_the_local_backend_reads_all_six_labels_as_deitas_scorer_does(tiny):
    """DEITA's scorer: softmax over the logits of the tokens "1".."6" at the first position, whatever
    their rank; the local backend returns them beside its top log-probs, so the expected score is exact."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = DEITA["complexity", "rubric"]
    conversation = prompt.conversation(prompt="Plan a three-day trip to Rome on a student budget.")
    [result] = LocalChat(tiny).chat([conversation], max_tokens=1, top_logprobs=2, label_tokens=prompt.labels)
    assert set(prompt.labels) <= set(result.top_logprobs[0])  # a random model ranks no digit in its top 2
    tokenizer, model = AutoTokenizer.from_pretrained(tiny), AutoModelForCausalLM.from_pretrained(tiny)
    with torch.inference_mode():
        logits = model(torch.tensor([LocalChat.encode(tokenizer, conversation)])).logits[0, -1]
    p = torch.softmax(logits[tokenizer.convert_tokens_to_ids(list(prompt.labels))].double(), dim=0)
    deita_score = float((p * torch.arange(1, 7, dtype=torch.float64)).sum())
    raw = json.dumps({"text": result.text, "top_logprobs": result.top_logprobs})
    assert prompt.parse(raw) == pytest.approx(deita_score, abs=1e-5)


def test_the_chat_field_embeds_the_last_token_of_the_templated_conversation(store, tiny):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_select.tasks.embed import build_embed

    folder = tiny
    chat = conversation("Hi", "Hello!", "Name a fruit.", "An apple.")
    signal = embed_signal(folder, field="chat", pooling="last", max_tokens=512)
    [vector] = build_embed(signal)(frame([chat])).outcomes
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    ids = tokenizer(tokenizer.apply_chat_template(chat["messages"], tokenize=False).rstrip(),
                    add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(int(ids[0, -1])) == "<|im_end|>"  # the end of the last turn
    with torch.inference_mode():
        last = model.model(input_ids=ids).last_hidden_state[0, -1].numpy()
    assert np.allclose(vector.value, last / np.linalg.norm(last), atol=1e-5)
    with pytest.raises(ValueError, match="needs pooling"):
        embed_signal(None, field="chat", pooling="sentence")


def test_the_default_budget_is_the_papers_share_of_its_pool():
    assert DeitaParams(dataset="x").budget == PAPER_SHARE == 6_000 / 306_000
