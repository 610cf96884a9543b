"""Every judge prompt of the project and its parser, in one home.

Each :class:`~sft_select.tasks.judge.Prompt` has a name, a version and the rubric it follows
(``rubric``: the paper or benchmark whose published criteria it asks for). The wording is ours,
written to those rubrics; it is part of the signal identity of what the prompt judges (its hash),
so a change of wording never reuses ratings made with the old one.

- AlpaGasus (Chen et al. 2023): accuracy or helpfulness 0-5, as text on the first line or as the
  expected score over the digit tokens (:data:`ALPAGASUS`).
- Judge-scored indicators of InstructMining and InstructionGPT-4 (:data:`INDICATORS`).
- DEITA (Liu et al. 2023): the complexity of a query and the quality of a response, each the
  expected score over "1".."6" at the first generated position, in our wording or in the input
  format of the released DEITA scorer models (:data:`DEITA`).
- Evaluation judges: pairwise preference against a reference answer (AlpacaEval's setting, both
  orders) and MT-Bench single-answer grading (:data:`PAIRWISE`, :data:`MT_BENCH`); their
  conversations are rendered with :meth:`Prompt.conversation` over their own fields.
"""

from __future__ import annotations

import re
from typing import Literal

from sft_select.tasks.judge import Prompt, expected_score_parser, first_number

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

# -- DEITA ---------------------------------------------------------------------------------------------

_DEITA_RUBRIC = ("Liu et al. 2023, DEITA: {} scored 1-6 (the scale of the ChatGPT rankings of Evol-Instruct variants "
                 "its scorers learn), read as the expected score over the digits at the first position")
_QUERY = "## Query\n{prompt}\n\n"
_DIGIT = " Reply with the score digit only."
# The released scorers (hkust-nlp/deita-complexity-scorer, deita-quality-scorer) were fine-tuned on exactly these
# input texts, sent as one raw prompt (no chat template): an interface, so it is kept to the character.
_SCORER_COMPLEXITY = ("You are a helpful assistant. Please identify the complexity score of the following user query. "
                      "\n##Query: {prompt}  \n##Complexity: ")
_SCORER_QUALITY = ("You are a helpful assistant. Please identify the quality score of the Response corresponding to "
                   "the Question. \n #Question#:\n{prompt}\n#Response#:\n{output} \n##Quality: ")


def _deita(name: str, template: str, rubric: str, system: str | None = None) -> Prompt:
    return Prompt(name=name, version="1", system=system, template=template, max_tokens=1, top_logprobs=20,
                  labels=tuple(str(k) for k in range(1, 7)), parse=expected_score_parser(range(1, 7)), rubric=rubric)


DEITA: dict[tuple[str, str], Prompt] = {
    ("complexity", "rubric"): _deita(
        "deita_complexity", _QUERY + "How complex is this query for an AI assistant to answer well? Score it from 1 "
        "to 6. 1: a simple request, one step or one fact, no conditions. 6: a demanding request: it sets several "
        "constraints or requirements, needs deep knowledge or a chain of reasoning steps, asks for something "
        "concrete and specific, or gives an intricate input to work on. Judge the query alone, not how long it "
        "is." + _DIGIT, _DEITA_RUBRIC.format("query complexity (the in-depth evolving directions: constraints, "
                                             "deepening, concretizing, reasoning steps, complicated input)"),
        system="You rate the queries users send to an AI assistant by how complex and demanding they are."),
    ("quality", "rubric"): _deita(
        "deita_quality", _QUERY + "## Response\n{output}\n\nHow good is this response to the query? Score it from "
        "1 to 6. 1: unhelpful, irrelevant or wrong. 6: excellent: helpful, relevant and accurate, with depth, "
        "creativity where it fits and the right level of detail. Judge what the response says, not its "
        "length." + _DIGIT, _DEITA_RUBRIC.format("response quality (the Evol-Quality directions: helpfulness, "
                                                 "relevance, depth, creativity, level of detail)"),
        system="You rate the responses an AI assistant gives to user queries."),
    ("complexity", "scorer"): _deita(
        "deita_complexity_scorer", _SCORER_COMPLEXITY,
        "the input format of the released DEITA complexity scorer (hkust-nlp/deita-complexity-scorer)"),
    ("quality", "scorer"): _deita(
        "deita_quality_scorer", _SCORER_QUALITY,
        "the input format of the released DEITA quality scorer (hkust-nlp/deita-quality-scorer)"),
}

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

__all__ = ["ALPAGASUS", "DEITA", "INDICATORS", "MT_BENCH", "MT_REFERENCE", "MT_REFERENCE_CATEGORIES", "PAIRWISE",
           "parse_rating", "parse_winner"]
