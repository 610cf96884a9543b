"""Every judge prompt of the project and its parser, in one home.

Each :class:`~sft_select.tasks.judge.Prompt` has a name, a version and the rubric it follows
(``rubric``: the paper or benchmark whose published criteria it asks for). The wording is ours,
written to those rubrics; it is part of the signal identity of what the prompt judges (its hash),
so a change of wording never reuses ratings made with the old one.

- AlpaGasus (Chen et al. 2023): accuracy or helpfulness 0-5, as text on the first line or as the
  expected score over the digit tokens (:data:`ALPAGASUS`).
- Judge-scored indicators of InstructMining and InstructionGPT-4 (:data:`INDICATORS`).
- InsTag (Lu et al. 2023): the query's intention tags with explanations, as JSON (:data:`INSTAG`).
- Evaluation judges: pairwise preference against a reference answer (AlpacaEval's setting, both
  orders) and MT-Bench single-answer grading (:data:`PAIRWISE`, :data:`MT_BENCH`); their
  conversations are rendered with :meth:`Prompt.conversation` over their own fields.
"""

from __future__ import annotations

import json
import re
from typing import Literal

from sft_select.tasks.judge import Prompt, expected_score_parser, first_number, parse_json_answer

# -- AlpaGasus -------------------------------------------------------------------------------------------

_REVIEW = ("You review answers written by an AI assistant. You are shown the task it was given (an "
           "instruction, sometimes with an input) and the answer it wrote.")
_PAIR = "### Instruction:\n{instruction}\n\n### Input:\n{input_or_none}\n\n### Response:\n{output}\n\n"
_ALPAGASUS_RUBRIC = "Chen et al. 2023, AlpaGasus, rating prompt (dimension, 0-5, score on the first line)"


def _alpagasus_rating(raw: str) -> float:
    return first_number(raw, low=0, high=5)


def _alpagasus(criterion: str, best: str) -> dict[tuple[str, str], Prompt]:
    scale = (f"Rate the {criterion} of the response to the instruction and its input on a scale from 0 to 5, where "
             f"5 means {best}.")
    return {
        (criterion, "text"): Prompt(
            name=f"alpagasus_{criterion}", version="1", system=_REVIEW, parse=_alpagasus_rating, max_tokens=256,
            rubric=_ALPAGASUS_RUBRIC,
            template=_PAIR + scale + " Put only the score, a number, on the first line. On the next lines explain "
            "the rating; judge what the response says, not how long it is or the order things are shown in."),
        (criterion, "expected"): Prompt(
            name=f"alpagasus_{criterion}_expected", version="1", system=_REVIEW, max_tokens=1, top_logprobs=20,
            parse=expected_score_parser(range(0, 6)), rubric=_ALPAGASUS_RUBRIC + "; the digit's distribution",
            template=_PAIR + scale + " Reply with the score digit only."),
    }


ALPAGASUS: dict[tuple[str, str], Prompt] = {
    **_alpagasus("accuracy", "fully correct and complete"),
    **_alpagasus("helpfulness", "as helpful as a response can be"),
}

# -- judge-scored indicators (InstructMining, InstructionGPT-4) -----------------------------------------

_ANNOTATE = ("You annotate instruction-tuning data. You are shown a task given to an AI assistant (an "
             "instruction, sometimes with an input) and the assistant's response, and you rate one "
             "property of the response.")
_FIRST_LINE = " Write only the score, a number, on the first line; you may explain it on the lines after."


def _indicator(name: str, question: str, low: int, high: int, rubric: str) -> Prompt:
    return Prompt(name=name, version="1", system=_ANNOTATE, parse=lambda raw: first_number(raw, low=low, high=high),
                  max_tokens=64, rubric=rubric, template=_PAIR + question + _FIRST_LINE)


_UNIEVAL = "Zhong et al. 2022, UniEval dialogue dimension {}, asked on a 1-5 scale"
INDICATORS: dict[str, Prompt] = {
    "quality": _indicator(
        "indicator_quality",
        "How good is this response as training data for an assistant: correct, helpful, complete and well "
        "written for the task? Give a score from 0 (useless) to 100 (excellent).", 0, 100,
        "Wei et al. 2023, InstructionGPT-4, GPT-4 quality score (0-100)"),
    "naturalness": _indicator(
        "indicator_naturalness",
        "How natural is the response: does it read like something a fluent, thoughtful person would write? "
        "Give a score from 1 (not at all) to 5 (completely).", 1, 5, _UNIEVAL.format("naturalness")),
    "coherence": _indicator(
        "indicator_coherence",
        "How coherent is the response: does it follow from the task and hold together from start to end? "
        "Give a score from 1 (not at all) to 5 (completely).", 1, 5, _UNIEVAL.format("coherence")),
    "understandability": _indicator(
        "indicator_understandability",
        "How understandable is the response: can a reader grasp what it says without effort? "
        "Give a score from 1 (not at all) to 5 (completely).", 1, 5, _UNIEVAL.format("understandability")),
}

# -- InsTag ---------------------------------------------------------------------------------------------

_INSTAG_RUBRIC = ("Lu et al. 2023, #InsTag, open-set tagging prompt (the user query's intention tags, each with an "
                  "explanation, as JSON tag/explanation objects)")


def parse_intent_tags(raw: str) -> str:
    """InsTag's tagging answer: a JSON list of ``{"tag": ..., "explanation": ...}`` objects (also one such
    object, a bare tag string in the list, or the list under a "tags" key), read with
    :func:`~sft_select.tasks.judge.parse_json_answer`. Returns the canonical JSON list of
    ``{"tag", "explanation"}`` (explanation null where none was given), tags stripped and each kept once.
    Raises ``ValueError`` when no tag can be read: no JSON, an item without a non-empty string "tag",
    or an empty list (every query has at least one intention)."""
    value = parse_json_answer(raw)
    if isinstance(value, dict):
        value = value["tags"] if isinstance(value.get("tags"), list) else [value]
    tags: dict[str, str | None] = {}
    for i, item in enumerate(value):
        tag, explanation = (item, None) if isinstance(item, str) else (
            (item.get("tag"), item.get("explanation")) if isinstance(item, dict) else (None, None))
        if not isinstance(tag, str) or not tag.strip():
            raise ValueError(f"item {i + 1} has no tag (a non-empty string under \"tag\"): {json.dumps(item)[:80]}")
        tags.setdefault(tag.strip(), explanation if isinstance(explanation, str) else None)
    if not tags:
        raise ValueError("the answer lists no tags")
    return json.dumps([{"tag": t, "explanation": e} for t, e in tags.items()], ensure_ascii=False)


INSTAG = Prompt(
    name="instag_tags", version="1", parse=parse_intent_tags, kind="json", max_tokens=512, rubric=_INSTAG_RUBRIC,
    system="You annotate the user queries of an instruction-tuning dataset with tags. You answer with JSON only.",
    template="""Tag the intentions of the user in a query: what the user asks for, the tasks and skills the answer \
needs, the subject, and any constraints on the answer (format, length, language, style). Each tag is a few words, \
with a one-sentence explanation. Use as many tags as the query needs. Answer with a JSON list of \
{{"tag": str, "explanation": str}} objects and nothing else.

Example query:
Give me three tips for staying focused while studying, as a numbered list.

Example answer:
[{{"tag": "advice", "explanation": "The user asks for tips."}}, {{"tag": "study skills", "explanation": "The tips \
are about studying."}}, {{"tag": "list format", "explanation": "The answer must be a numbered list of three items."}}]

Query:
{prompt}

Answer:""")

# -- evaluation judges ----------------------------------------------------------------------------------


def parse_winner(text: str) -> Literal["A", "B"]:
    """The verdict of a pairwise judge: "Winner: A"/"Winner: B" (or a bare A/B line)."""
    m = re.search(r"winner\W{0,4}(?:response\s+)?\(?([AB])\b", text, flags=re.IGNORECASE)
    if m is None:
        m = re.match(r"^\W*(?:response\s+|output\s+)?\(?([AB])\)?\W*$", text.strip().splitlines()[0] if text.strip()
                     else "", flags=re.IGNORECASE)
    if m is None:
        raise ValueError(f"no verdict in {text[:80]!r}")
    return "A" if m.group(1).upper() == "A" else "B"


def parse_rating(text: str, low: float = 1.0, high: float = 10.0) -> float:
    """The last ``[[N]]`` in a judge's answer (else a "Rating: N"), within ``[low, high]``."""
    found = re.findall(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]", text) or re.findall(
        r"rating\s*[:=]\s*\**\s*(\d+(?:\.\d+)?)", text, flags=re.IGNORECASE)
    if not found:
        raise ValueError(f"no rating in {text[-80:]!r}")
    value = float(found[-1])
    if not low <= value <= high:
        raise ValueError(f"rating {value:g} outside [{low:g}, {high:g}]")
    return value


PAIRWISE = Prompt(
    name="pairwise_preference", version="1", parse=parse_winner, max_tokens=16,
    rubric="AlpacaEval (Li et al. 2023): which of two responses a user prefers, judged in both orders",
    system=("You are an impartial evaluator of AI assistants. You compare two responses to one "
            "instruction and say which one a careful user would prefer."),
    template="""Instruction:
{instruction}

Response A:
{a}

Response B:
{b}

Decide which response follows the instruction better: more helpful, correct and complete for what was \
asked. Do not let the length of a response or the order in which they are shown sway you. Reply with a \
single line, "Winner: A" or "Winner: B".""")

MT_BENCH = Prompt(
    name="mt_bench_single", version="1", parse=parse_rating, max_tokens=512,
    rubric="Zheng et al. 2023, MT-Bench single-answer grading (1-10, [[rating]], references for math, "
           "reasoning and coding)",
    system="You are a strict, fair grader of the answers an AI assistant gives to users.",
    template="""Grade the assistant's {which} answer in the conversation below on a scale from 1 (useless or \
wrong) to 10 (excellent). Consider how helpful, relevant, accurate, deep, creative and detailed it is.{reference}
First explain your judgement in a few sentences, objectively. Then give the rating in double square \
brackets on the last line, for example: Rating: [[7]]

{conversation}""")
MT_REFERENCE = """ A reference answer is given below: use it to judge correctness, and rate a wrong answer low \
however well it is written.

[Reference answer]
{reference}
[End of reference answer]
"""
MT_REFERENCE_CATEGORIES = ("math", "reasoning", "coding")

__all__ = ["ALPAGASUS", "INDICATORS", "INSTAG", "MT_BENCH", "MT_REFERENCE", "MT_REFERENCE_CATEGORIES", "PAIRWISE",
           "parse_intent_tags", "parse_rating", "parse_winner"]
