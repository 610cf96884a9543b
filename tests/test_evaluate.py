"""evaluate-subset on a tiny fine-tuned Llama: reference loss (lower after fine-tuning on the task),
IFEval generation + rules, the pairwise judge in both orders and MT-Bench grading against the
local OpenAI-compatible test server, catalog rows, and reuse of finished results."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest

from openai_server import OpenAIServer, last_user
from sft_select.settings import settings
from tiny_lm import WORDS, repeat_examples, repeat_word, tiny_home

pytestmark = pytest.mark.slow

REFERENCE = WORDS[:4]  # answers of the task the model was tuned on


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One store and model cache for the module, a tiny base and a LoRA model fine-tuned on the toy task."""
    root = tmp_path_factory.mktemp("evaluate")
    with tiny_home(root) as (base, _):
        from sft_select.tasks.finetune import Recipe, finetune

        ref = finetune(repeat_examples(), base, Recipe(max_steps=30, batch_size=4, lr=2e-2, warmup_ratio=0.0,
                                                       save_steps=100))
        reference = root / "reference.json"
        reference.write_text(json.dumps([repeat_word(w) for w in REFERENCE]))
        yield {"root": root, "base": base, "ref": ref, "reference": reference}


def test_reference_loss_is_lower_after_finetuning_and_written_to_the_catalog(env):
    from sft_select.tasks.evaluate import ReferenceLoss, evaluate, evaluations
    from sft_select.tasks.finetune import load_finetuned

    suite = ReferenceLoss(path=env["reference"])
    tuned = evaluate(env["ref"], suite, selection_id="sel-a")
    base = evaluate(env["base"], suite)
    assert tuned.n == base.n == len(REFERENCE) and tuned.metrics["errors"] == 0
    assert tuned.metrics["loss"] < base.metrics["loss"] - 0.1

    rows = evaluations("sel-a")
    assert set(rows["metric"]) == {"loss", "errors"} and set(rows["model"]) == {f"finetuned:{env['ref'].key}"}
    assert rows.filter(pl.col("metric") == "loss")["value"][0] == pytest.approx(tuned.metrics["loss"])

    model, _ = load_finetuned(env["ref"])  # the model the suite scored is the one load_finetuned gives
    assert getattr(model, "_hf_peft_config_loaded", False)

    again = evaluate(env["ref"], suite, selection_id="sel-b")  # same model and suite: reused, new rows
    assert again.reused and again.metrics == tuned.metrics and again.evaluation_id != tuned.evaluation_id
    assert tuned.seconds > 0 and again.seconds == tuned.seconds  # the cost of computing it, kept with the result
    assert evaluations("sel-b").height == 2
    limited = evaluate(env["ref"], ReferenceLoss(path=env["reference"], limit=2))
    assert limited.n == 2 and not limited.reused


def test_ifeval_generates_and_scores_by_rules(env, tmp_path):
    from sft_select.tasks.evaluate import IFEval, details_path, evaluate

    items = [
        {"key": 1, "prompt": "Say hello without commas.", "instruction_id_list": ["punctuation:no_comma"],
         "kwargs": [{}]},
        {"key": 2, "prompt": "Write at least 500 words about fruit.",
         "instruction_id_list": ["length_constraints:number_words"],
         "kwargs": [{"num_words": 500, "relation": "at least"}]},
        {"key": 3, "prompt": "Wrap your answer in JSON.", "instruction_id_list": ["detectable_format:json_format"],
         "kwargs": [{}]},
    ]
    path = tmp_path / "ifeval.jsonl"
    path.write_text("\n".join(json.dumps(i) for i in items))
    result = evaluate(env["ref"], IFEval(path=path, max_new_tokens=8, batch_size=2))
    assert result.n == 3 and result.metrics["generation_errors"] == 0
    details = pl.read_parquet(details_path(result))
    assert details["response"].null_count() == 0
    # 8 new tokens can never make 500 words: that instruction fails, strictly and loosely
    assert details.filter(pl.col("key") == 2)["loose"].to_list() == [[False]]
    for metric in ("prompt_strict", "instruction_strict", "prompt_loose", "instruction_loose"):
        assert 0.0 <= result.metrics[metric] <= 1.0
    assert result.metrics["prompt_loose"] >= result.metrics["prompt_strict"]
    assert result.metrics["prompt_strict"] <= 2 / 3


@pytest.fixture
def judge_server(monkeypatch):
    def serve(answer):
        server = OpenAIServer(answer=answer).__enter__()
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        monkeypatch.setenv("SFT_SELECT_LLM", "openai:judge")
        settings.cache_clear()
        servers.append(server)
        return server

    servers: list[OpenAIServer] = []
    yield serve
    for s in servers:
        s.__exit__(None, None, None)
    settings.cache_clear()


def _responses(prompt: str) -> tuple[str, str]:
    a = prompt.split("Response A:\n", 1)[1].split("\n\nResponse B:\n", 1)[0]
    b = prompt.split("Response B:\n", 1)[1].split("\n\nDecide which response", 1)[0]
    return a, b


def test_pairwise_judge_sees_both_orders_and_cancels_position_bias(env, judge_server):
    from sft_select.tasks.evaluate import PairwiseJudge, evaluate

    biased = judge_server(lambda request: "Winner: A")  # always the first position
    result = evaluate(env["ref"], PairwiseJudge(path=env["reference"], max_new_tokens=6, judge="openai:judge"))
    assert biased.completions == 2 * len(REFERENCE)
    assert result.metrics == {"win_rate": 0.5, "order_agreement": 0.0, "judge_errors": 0.0}
    references = {repeat_word(w)["output"] for w in REFERENCE}
    orders = [_responses(last_user(body)) for body in biased.bodies]
    assert sum(b in references for _, b in orders) == len(REFERENCE)  # model first, reference second
    assert sum(a in references for a, _ in orders) == len(REFERENCE)  # and swapped

    def prefers_reference(request):
        a, b = _responses(last_user(request))
        return "Winner: A" if a in references else "Reasoning first.\nWinner: B"

    fair = judge_server(prefers_reference)
    result = evaluate(env["ref"], PairwiseJudge(path=env["reference"], max_new_tokens=7, judge="openai:judge"))
    assert fair.completions == 2 * len(REFERENCE)
    assert result.metrics == {"win_rate": 0.0, "order_agreement": 1.0, "judge_errors": 0.0}


def test_pairwise_unparseable_verdicts_are_errors_not_defaults(env, judge_server):
    from sft_select.tasks.evaluate import PairwiseJudge, evaluate

    judge_server(lambda request: "Both are fine.")
    result = evaluate(env["ref"], PairwiseJudge(path=env["reference"], max_new_tokens=5, judge="openai:judge"))
    assert result.metrics["judge_errors"] == len(REFERENCE) and math.isnan(result.metrics["win_rate"])


def test_an_evaluation_that_died_after_its_judge_calls_pays_for_none_again(env, judge_server):
    from sft_select.tasks.evaluate import PairwiseJudge, details_path, evaluate
    from sft_select.tasks.signal_task import get_store
    from sft_select.tasks.judge import chat_signal

    suite = PairwiseJudge(path=env["reference"], max_new_tokens=4, judge="openai:judge")
    first = judge_server(lambda request: "Winner: B")
    done = evaluate(env["ref"], suite)
    assert first.completions == 2 * len(REFERENCE)
    details_path(done).unlink()  # as if the process died after the judge's last batch, before writing the result

    first.answer, before = (lambda request: "Winner: A"), first.completions  # another verdict, were it asked
    again = evaluate(env["ref"], suite)
    assert first.completions == before and not again.reused and again.metrics == done.metrics
    answers = get_store().signals.read(chat_signal(f"finetuned:{env['ref'].key}", temperature=0.0, max_tokens=4))
    assert answers.height == len(REFERENCE) and answers["error"].null_count() == len(REFERENCE)


def test_mt_bench_grades_both_turns_with_references_for_math(env, judge_server, tmp_path):
    from sft_select.tasks.evaluate import MTBench, evaluate

    questions = tmp_path / "questions.jsonl"
    questions.write_text("\n".join(json.dumps(q) for q in [
        {"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Now make it rhyme."]},
        {"question_id": 111, "category": "math", "turns": ["What is 2+2?", "And times 3?"]},
    ]))
    references = tmp_path / "reference.jsonl"
    references.write_text(json.dumps({"question_id": 111, "model_id": "gpt-4",
                                      "choices": [{"index": 0, "turns": ["REF-FOUR", "REF-TWELVE"]}]}))

    def grade(request):
        prompt = last_user(request)
        return "Short reason.\nRating: [[3]]" if "REF-" in prompt else "Fine.\nRating: [[8]]"

    server = judge_server(grade)
    result = evaluate(env["ref"], MTBench(path=questions, reference_path=references, max_new_tokens=5,
                                          judge="openai:judge"))
    assert server.completions == 4 and result.n == 4
    assert result.metrics == {"score": 5.5, "judge_errors": 0.0, "score_turn1": 5.5, "score_turn2": 5.5}
    prompts = [last_user(b) for b in server.bodies]
    assert sum("REF-FOUR" in p for p in prompts) == 1 and sum("REF-TWELVE" in p for p in prompts) == 1
    second_turn = next(p for p in prompts if "REF-TWELVE" in p)
    assert "What is 2+2?" in second_turn and "And times 3?" in second_turn  # the whole conversation


def test_rating_and_winner_parsers():
    from sft_select.tasks.prompts import parse_rating, parse_winner

    assert parse_rating("ok [[2]] then [[7.5]]") == 7.5 and parse_rating("Rating: 4") == 4.0
    assert parse_winner("Winner: B") == "B" and parse_winner("**Winner:** (a)") == "A" and parse_winner("B") == "B"
    for bad, parser in [("[[11]]", parse_rating), ("no score", parse_rating), ("A or B?", parse_winner)]:
        with pytest.raises(ValueError):
            parser(bad)


def test_prefect_task_reuses_the_result(env, prefect_api):
    from prefect import flow

    from sft_select.tasks.evaluate import ReferenceLoss, details_path, evaluate_task

    suite = ReferenceLoss(path=env["reference"], limit=3)

    @flow
    def run():
        state = evaluate_task(env["ref"], suite, "sel-prefect", return_state=True)
        return state.name, state.result()

    (n1, r1), (n2, r2), (n3, r3) = run(), run(), run()
    assert (n1, n2, n3) == ("Completed", "Completed", "Cached") and r2.reused and r1.metrics == r3.metrics
    assert details_path(r3).exists()
