"""Every judge prompt of the project and its parser, in one home.

Each :class:`~sft_select.tasks.judge.Prompt` has a name, a version and the rubric it follows
(``rubric``: the paper or benchmark whose published criteria it asks for). The wording is ours,
written to those rubrics; it is part of the signal identity of what the prompt judges (its hash),
so a change of wording never reuses ratings made with the old one.

- AlpaGasus (Chen et al. 2023): accuracy or helpfulness 0-5, as text on the first line or as the
  expected score over the digit tokens (:data:`ALPAGASUS`).
- Judge-scored indicators of InstructMining and InstructionGPT-4 (:data:`INDICATORS`).
- InsTag (Lu et al. 2023): the query's intention tags with explanations, as JSON (:data:`INSTAG`).
- DEITA (Liu et al. 2023): the complexity of a query and the quality of a response, each the
  expected score over "1".."6" at the first generated position, in our wording or in the input
  format of the released DEITA scorer models (:data:`DEITA`).
- Evaluation judges: pairwise preference against a reference answer (AlpacaEval's setting, both
  orders) and MT-Bench single-answer grading (:data:`PAIRWISE`, :data:`MT_BENCH`); their
  conversations are rendered with :meth:`Prompt.conversation` over their own fields.
- LIFT (Xu et al. 2023): accuracy, explanation, clarity and difficulty (35/25/15/25 points), one a
  line, or each as an expected digit (:data:`LIFT_QUALITY`, :data:`LIFT_EXPECTED`).
- Tree-Instruct (Zhao et al. 2023): the instruction's semantic tree and its node count on the last
  line (:data:`TREE_INSTRUCT_NODES`).
- WaveCoder (Yu et al. 2023): the discriminator's yes/no checklist, every answer kept
  (:data:`WAVECODER_CHECKLIST`).
- Humpback (Li et al. 2023): the backward model's instruction for a text, and self-curation's 1-5
  rating ending with "Score: N" (:data:`HUMPBACK_BACKWARD`, :data:`HUMPBACK_CURATION`).
- TEGIT (Chen et al. 2023): the task generator's (instruction, input, output) from a document and
  the discriminator's accept/reject with a reason (:data:`TEGIT_TASK`, :data:`TEGIT_DISCRIMINATOR`).
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

# -- LIFT (Xu et al. 2023) --------------------------------------------------------------------------------

LIFT_POINTS: dict[str, int] = {"accuracy": 35, "explanation": 25, "clarity": 15, "difficulty": 25}
"""LIFT's quality rubric: each criterion's share of the 100 points (the authors' GPT-4 prompt)."""
_LIFT_QUESTIONS = {
    "accuracy": "is the response correct, and does it actually solve the problem the instruction poses?",
    "explanation": "does the response explain its answer (and any code it gives) in enough detail to learn from?",
    "clarity": "does the instruction state its problem clearly and precisely?",
    "difficulty": "how hard is the problem the instruction poses? A harder problem scores higher.",
}
_LIFT_SYSTEM = ("You assess instruction-tuning data. You are shown a task given to an AI assistant (an "
                "instruction, sometimes with an input) and the response it wrote, and you score the example.")
_LIFT_RUBRIC = ("Xu et al. 2023, LIFT, quality curation: GPT-4 scores accuracy (35), explanations (25), clarity (15) "
                "and difficulty (25), 100 in all")


def parse_lift_parts(raw: str) -> dict[str, float]:
    """The four LIFT criteria from lines such as ``Accuracy: 30`` (``**Clarity**: 12/15`` allowed),
    each within its points; every criterion must be there."""
    parts: dict[str, float] = {}
    for line in raw.splitlines():
        m = re.match(r"^[\s*#>_`-]*(accuracy|explanations?|clarity|difficulty)[\s*_`]*(?:\([^)]*\))?\s*[:=]\s*[*_`]*"
                     r"(\d+(?:\.\d+)?)", line, flags=re.IGNORECASE)
        if m is not None:
            parts.setdefault(m.group(1).lower().rstrip("s"), float(m.group(2)))
    missing = [c for c in LIFT_POINTS if c not in parts]
    if missing:
        raise ValueError(f"no score for {', '.join(missing)} in {raw.strip()[:80]!r}")
    for criterion, value in parts.items():
        if not 0 <= value <= LIFT_POINTS[criterion]:
            raise ValueError(f"{criterion} {value:g} outside [0, {LIFT_POINTS[criterion]}]")
    return {c: parts[c] for c in LIFT_POINTS}


def _lift_parts_json(raw: str) -> str:
    return json.dumps(parse_lift_parts(raw), sort_keys=True)


LIFT_QUALITY = Prompt(
    name="lift_quality", version="1", system=_LIFT_SYSTEM, parse=_lift_parts_json, kind="json", max_tokens=64,
    rubric=_LIFT_RUBRIC + "; each part on its own line",
    template=_PAIR + "Score this example on four criteria, 100 points in all:\n"
    + "".join(f"- {c.capitalize()} (0-{p}): {_LIFT_QUESTIONS[c]}\n" for c, p in LIFT_POINTS.items())
    + "Be strict: a full score should be rare. Answer with exactly these four lines, a number after each colon, "
      "and nothing else:\n" + "".join(f"{c.capitalize()}: <0-{p}>\n" for c, p in LIFT_POINTS.items()))
"""LIFT's judge, text form: the four part scores, one a line (the signal keeps all four as JSON)."""

LIFT_EXPECTED: dict[str, Prompt] = {
    c: Prompt(name=f"lift_{c}_expected", version="1", system=_LIFT_SYSTEM, max_tokens=1, top_logprobs=20,
              parse=expected_score_parser(range(0, 10)), rubric=_LIFT_RUBRIC + f"; {c} alone, the digit's distribution",
              template=_PAIR + f"Rate only the {c} of this example: {_LIFT_QUESTIONS[c]} Use a scale from 0 (not at "
              "all) to 9 (fully). Reply with the digit only.")
    for c in LIFT_POINTS
}
"""LIFT's judge, expected form: one call per criterion, the expected digit over "0".."9" (scaled to the
criterion's points by the flow)."""

# -- Tree-Instruct (Zhao et al. 2023) ---------------------------------------------------------------------


def parse_node_count(raw: str) -> float:
    """Tree-Instruct's complexity: the node count on the LAST non-empty line of the answer (a bare
    number, or "Nodes: 7", "Total number of nodes = **7**", "The number of nodes is 7."; a tree line
    such as "node 7" is not a count); anything else there is a parse failure."""
    lines = [ln for ln in raw.strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else ""
    m = re.match(r"^[\s*#>_`\"'-]*(?:(?:the\s+)?(?:total\s+)?(?:number\s+of\s+nodes|node\s+count|nodes?|count)"
                 r"(?:\s+in\s+the\s+tree)?[\s*_`]*(?:is|[:=])\s*)?[*_`\"']*(\d+)[*_`\"'.]*\s*$", line,
                 flags=re.IGNORECASE)
    if m is None:
        raise ValueError(f"no node count on the last line: {line[:80]!r}")
    count = int(m.group(1))
    if count < 1:
        raise ValueError(f"node count {count} is not positive")
    return float(count)


TREE_INSTRUCT_NODES = Prompt(
    name="tree_instruct_nodes", version="1", parse=parse_node_count, max_tokens=384,
    rubric="Zhao et al. 2023, Tree-Instruct: the instruction parsed into a semantic tree; its node count is the "
           "instruction's complexity",
    system="You analyse the structure of instructions given to AI assistants.",
    template="""Parse the instruction below into a semantic tree, as in semantic parsing: the root is the main \
action the instruction asks for, and every object, attribute, constraint and sub-task it names is a node under \
the node it belongs to. Write the tree with one node a line, indented by depth. Then count the nodes of the \
tree, the root included, and write that count as a bare number on the last line, with nothing after it.

Instruction: "{instruction}"
""")

# -- WaveCoder (Yu et al. 2023) ---------------------------------------------------------------------------

WAVECODER_CHECKS: dict[str, str] = {
    "language": "the instruction states which programming language to use.",
    "relevant": "the solution addresses the instruction and the information: it is a concrete resolution of them.",
    "code_only": "the solution holds only code, with comments inside the code, and no explanation outside it.",
    "logic": "the solution's logic is complete and easy to follow: no steps are missing, and the algorithm is not "
             "buried in complex or poorly documented functions.",
    "imports": "the code imports every library it needs.",
    "overall": "every requirement above is met.",
}
"""WaveCoder's discriminator checklist, in its order: label -> requirement."""


def parse_checklist(raw: str) -> str:
    """Every answer of the WaveCoder checklist, from lines "label: yes|no - reason" (numbering,
    markdown and a space for the underscore allowed), as JSON ``{label: true|false}``; a label
    without a yes or no is a parse failure."""
    answers: dict[str, bool] = {}
    for label in WAVECODER_CHECKS:
        pattern = label.replace("_", r"[\s_-]?")
        m = re.search(rf"^[\s*#>_`-]*(?:\d+[.)]\s*)?[*_`]*{pattern}[*_`]*\s*[:=-]\s*[*_`]*(yes|no)\b", raw,
                      flags=re.IGNORECASE | re.MULTILINE)
        if m is None:
            missing = [k for k in WAVECODER_CHECKS if k not in answers and k != label]
            raise ValueError(f"no yes/no for {label!r} in {raw.strip()[:80]!r}" + (
                f" (nor checked yet: {', '.join(missing)})" if missing else ""))
        answers[label] = m.group(1).lower() == "yes"
    return json.dumps(answers)


WAVECODER_CHECKLIST = Prompt(
    name="wavecoder_checklist", version="1", parse=parse_checklist, kind="json", max_tokens=256,
    rubric="Yu et al. 2023, WaveCoder, LLM discriminator: a yes/no checklist (language stated, solution matches the "
           "instruction, only code and comments, no missing logic, imports present, overall)",
    system="You are a strict reviewer of instruction data for training code assistants.",
    template="""Below is one training example: an instruction, optional information (its input) and the solution \
written for it.

### Instruction:
{instruction}

### Information:
{input_or_none}

### Solution:
{output}

Check the example against each requirement and answer yes or no:
""" + "".join(f"- {label}: {text}\n" for label, text in WAVECODER_CHECKS.items()) + """
Answer with exactly six lines, one per requirement in this order, each the label, a colon, yes or no, and a \
short reason, for example:
language: no - the instruction does not name a language
""")

# -- Instruction backtranslation / Humpback (Li et al. 2023) ----------------------------------------------


def _one_text(raw: str, label: str) -> str:
    text = re.sub(rf"^\s*[*_#]*\s*{label}\s*[*_]*\s*:\s*", "", raw.strip(), flags=re.IGNORECASE).strip()
    if not text:
        raise ValueError(f"empty {re.sub(r'[^a-z|]', '', label.lower()).split('|')[0]}")
    return text


def parse_backtranslated(raw: str) -> str:
    """The backward model's answer, the instruction itself (a leading "Instruction:" label dropped), as
    JSON ``{"instruction": ...}``; an empty answer is a parse failure."""
    return json.dumps({"instruction": _one_text(raw, "instruction")}, ensure_ascii=False)


_HUMPBACK_RUBRIC = ("Li et al. 2023, Self-Alignment with Instruction Backtranslation (Humpback): the backward model "
                    "M_yx writes the instruction x for an output y")

HUMPBACK_BACKWARD = Prompt(
    name="humpback_backward", version="1", parse=parse_backtranslated, kind="json", max_tokens=128,
    rubric=_HUMPBACK_RUBRIC + "; the fine-tuned backward model's own format: the text is the whole user turn",
    template="{text}")
"""Self-augmentation with a backward model fine-tuned here on (output -> instruction) seed pairs: the text is
the user turn, exactly as in its training data, and the answer is the instruction."""

HUMPBACK_BACKWARD_PROMPTED = Prompt(
    name="humpback_backward_prompted", version="1", parse=parse_backtranslated, kind="json", max_tokens=128,
    rubric=_HUMPBACK_RUBRIC + "; a prompted model instead of a fine-tuned one",
    system="You reconstruct the requests that texts were written to answer.",
    template="""Here is a text that an assistant wrote in reply to a user's request:

{text}

Write the request the user most likely made, so that this text is a good answer to it. Reply with the request \
only, as the user would have written it.""")
"""Self-augmentation with a backward model that was not fine-tuned for it (``backward=<LLM spec>``)."""


def parse_score_line(raw: str) -> float:
    """Humpback's curation score: the LAST "Score: N" in the answer, N an integer 1-5 (markdown around
    it allowed); none there, or N outside 1-5, is a parse failure."""
    found = re.findall(r"score\s*[*_]*\s*[:=]\s*[*_]*\s*(\d+(?:\.\d+)?)", raw, flags=re.IGNORECASE)
    if not found:
        raise ValueError(f"no 'Score: N' line in {raw.strip()[-80:]!r}")
    value = float(found[-1])
    if value != int(value) or not 1 <= value <= 5:
        raise ValueError(f"score {found[-1]} is not an integer from 1 to 5")
    return value


HUMPBACK_CURATION = Prompt(
    name="humpback_curation", version="1", parse=parse_score_line, max_tokens=256,
    rubric="Li et al. 2023, Humpback self-curation: the seed model rates each (instruction, output) pair on a "
           "5-point additive scale of how well it answers as an AI assistant, ending with 'Score: N'",
    system="You review instruction-response pairs for training an AI assistant.",
    template="""Below is an instruction from a user and a candidate answer. Rate how good the answer is as the \
reply of a helpful AI assistant, on this 5-point scale:

1: the answer is incomplete, vague, off-topic, controversial, or not what the user asked for (it misses content, \
is badly organised, or holds promotional or irrelevant text).
2: the answer addresses most of the request but not directly; it only suggests how to do it, or covers part of \
the question.
3: the answer is helpful and covers the basic asks, but reads as if it were not written by an assistant: a \
personal blog post, a web page or a forum reply, possibly with personal opinion or unrelated links.
4: the answer is written from an assistant's point of view, addresses the instruction clearly, completely and \
well organised; it could be a little more concise or focused.
5: a perfect assistant answer: focused on the instruction, expert and engaging, nothing irrelevant.

### Instruction:
{instruction}

### Answer:
{output}

Explain your reasoning briefly, then write the score on the last line as "Score: N" (N from 1 to 5).""")
"""Humpback's self-curation rating (a float signal: the score 1-5; no "Score: N" line is a stored failure)."""

# -- TEGIT (Chen et al. 2023c) ------------------------------------------------------------------------------

_SECTION = re.compile(r"^[\s*#>_`-]*(?:the\s+)?(instruction|input|output)(?:\s+is)?[*_`]*\s*:[*_`]*[ \t]*",
                      flags=re.IGNORECASE | re.MULTILINE)


def _sections(raw: str, header: re.Pattern[str], required: tuple[str, ...], optional: str) -> dict[str, str]:
    """Each section's text by its header's (lower-cased) name; a section runs to the next header, and the first
    section of each name counts. A ``required`` section missing or empty is a parse failure; the ``optional``
    one is "" when absent or "none" (or "(none)", "n/a", "empty")."""
    heads = list(header.finditer(raw))
    parts: dict[str, str] = {}
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(raw)
        parts.setdefault(m.group(1).lower().replace("_", " "), raw[m.end():end].strip())
    for key in required:
        if not parts.get(key):
            raise ValueError(f"no {key} section in {raw.strip()[:80]!r}")
    if parts.get(optional, "").strip(" .()[]").lower() in ("none", "n/a", "empty", ""):
        parts[optional] = ""
    return parts


def parse_task(raw: str) -> str:
    """A TEGIT task from "Instruction: ... / Input: ... / Output: ..." sections (each header at the start
    of a line, markdown and "The instruction is:" allowed, as small models write it; a section runs to the
    next header), as JSON ``{instruction, input,
    output}``. Instruction and output must not be empty; an input of "none" (or "(none)", "n/a") is empty."""
    parts = _sections(raw, _SECTION, ("instruction", "output"), "input")
    return json.dumps({"instruction": parts["instruction"], "input": parts["input"], "output": parts["output"]},
                      ensure_ascii=False)


def format_task(instruction: str, input: str, output: str) -> str:
    """A task as the generator writes it (the answer a fine-tuned generator is trained on)."""
    return f"Instruction: {instruction}\nInput: {input or 'none'}\nOutput: {output}"


TEGIT_TASK = Prompt(
    name="tegit_task", version="1", parse=parse_task, kind="json", max_tokens=512,
    rubric="Chen et al. 2023, TeGit: a task generator designs an instruction task (instruction, input, output) "
           "grounded on a human-written document",
    system="You design instruction-following tasks for training AI assistants from human-written documents.",
    template="""Read the document below and design one task that a user could ask an AI assistant, grounded in \
the document: its answer must follow from what the document says. Write the instruction the user gives, an input \
when the task needs one (a passage, data or a question taken from the document; write "none" otherwise), and the \
output: a complete, correct answer as an assistant would write it.

Document:
{document}

Answer in exactly this form:
Instruction: <the instruction>
Input: <the input, or none>
Output: <the answer>""")
"""TEGIT's task generator (a JSON signal: ``{instruction, input, output}``)."""


def parse_verdict(raw: str) -> str:
    """TEGIT's discriminator verdict from a "Decision: accept|reject" line and the reason (a "Reason:"
    line, or the rest of the answer), as JSON ``{accept, reason}``; no decision is a parse failure."""
    m = re.search(r"decision\s*[*_]*\s*[:=]\s*[*_]*\s*(accept(?:ed)?|reject(?:ed)?)\b", raw, flags=re.IGNORECASE)
    if m is None:
        raise ValueError(f"no 'Decision: accept|reject' line in {raw.strip()[:80]!r}")
    reason = re.search(r"reason\s*[*_]*\s*[:=]\s*(.+)", raw, flags=re.IGNORECASE | re.DOTALL)
    text = (reason.group(1) if reason else (raw[:m.start()] + raw[m.end():])).strip()
    return json.dumps({"accept": m.group(1).lower().startswith("accept"), "reason": text}, ensure_ascii=False)


TEGIT_DISCRIMINATOR = Prompt(
    name="tegit_discriminator", version="1", parse=parse_verdict, kind="json", max_tokens=192,
    rubric="Chen et al. 2023, TeGit: a task discriminator accepts or rejects each generated task (grounded in "
           "the document, answerable, a correct and complete output), with a reason",
    system="You check instruction-following tasks designed from documents before they are used for training.",
    template="""A task was designed from the document below. Accept it only if all of these hold: the \
instruction is clear and can be done; the output answers it correctly and completely; what the output states \
follows from the document (nothing invented); the input, when there is one, is what the instruction needs.

Document:
{document}

Task:
Instruction: {instruction}
Input: {input_or_none}
Output: {output}

Answer with two lines:
Decision: accept or reject
Reason: <one sentence>""")
"""TEGIT's task discriminator (a JSON signal: ``{accept, reason}``)."""

# -- Generation halves of LIFT, Tree-Instruct and WaveCoder ----------------------------------------------------


def parse_answer(raw: str) -> str:
    """A generator's answer to an instruction, the whole text (a leading "Answer:"/"Response:" label dropped),
    as JSON ``{"output": ...}``; an empty answer is a parse failure."""
    return json.dumps({"output": _one_text(raw, "(?:answer|response)")}, ensure_ascii=False)


GENERATED_ANSWER = Prompt(
    name="generated_answer", version="1", parse=parse_answer, kind="json", max_tokens=512,
    rubric="the generator answers an instruction it (or another generator) wrote: LIFT's expansion and "
           "Tree-Instruct's augmentation both have the new instructions answered by the generating LLM",
    system="You are a helpful, knowledgeable assistant. Answer the user's request completely and correctly.",
    template="{prompt}")
"""The answer to a generated instruction (a JSON signal: ``{output}``); ``prompt`` is the user turn."""


def parse_numbered(raw: str) -> str:
    """Instructions written as a numbered list ("1. ...", "2) ...", markdown allowed; a line that does not
    start a new item continues the one before), as a JSON list of ``{"instruction": ...}``; no item is a
    parse failure."""
    items: list[str] = []
    for line in raw.splitlines():
        m = re.match(r"^\s*[*_#>-]*\s*(?:instruction\s*)?\d+\s*[.):]\s*[*_]*\s*(.*)$", line, flags=re.IGNORECASE)
        if m:
            items.append(re.sub(r"[*_]+$", "", m.group(1).strip()).strip())
        elif items and line.strip():
            items[-1] = f"{items[-1]}\n{line.strip()}"
    items = [i for i in items if i]
    if not items:
        raise ValueError(f"no numbered instruction in {raw.strip()[:80]!r}")
    return json.dumps([{"instruction": i} for i in items], ensure_ascii=False)


LIFT_EXPAND = Prompt(
    name="lift_expand", version="1", parse=parse_numbered, kind="json", max_tokens=512,
    rubric="Xu et al. 2023, LIFT, dataset distribution expansion: an LLM writes new instructions from the original "
           "ones, varied in topic and form and more demanding, to broaden the data distribution",
    system="You write new instructions for training AI assistants, taking existing instructions as a starting point.",
    template="""Here is an instruction that a user gave an AI assistant:

{prompt}

Write {n} new instructions inspired by it. Each must be a complete request that an assistant can answer on its \
own (include any text or data it needs), and each must differ from the original and from the others: take it to \
another topic or domain, ask for another kind of output, or make it more demanding by adding a requirement, a \
constraint or a step of reasoning. Do not answer them.

Write only the numbered list, one instruction per item:
1. <new instruction>
2. <new instruction>""")
"""LIFT's expansion (a JSON signal: a list of ``{instruction}``): ``n`` new instructions from one original."""


def parse_new_instruction(raw: str) -> str:
    """Tree-Instruct's rewritten instruction: the first paragraph after the LAST "New instruction:" header
    (markdown, "Here is the new instruction:" and quotes allowed; a remark after a blank line is not part of
    it), as JSON ``{"instruction": ...}``; no such header, or nothing after it, is a parse failure."""
    heads = list(re.finditer(r"^[\s*#>_-]*(?:here\s+is\s+)?(?:the\s+)?new\s+instruction[*_]*\s*:[*_]*[ \t]*", raw,
                             flags=re.IGNORECASE | re.MULTILINE))
    if not heads:
        raise ValueError(f"no 'New instruction:' section in {raw.strip()[-80:]!r}")
    text = re.split(r"\n\s*\n", raw[heads[-1].end():].strip())[0].strip().strip('"').strip()
    if not text:
        raise ValueError("empty new instruction")
    return json.dumps({"instruction": text}, ensure_ascii=False)


TREE_INSTRUCT_AUGMENT = Prompt(
    name="tree_instruct_augment", version="1", parse=parse_new_instruction, kind="json", max_tokens=512,
    rubric="Zhao et al. 2023, Tree-Instruct: parse the instruction into a semantic tree, add a given number of "
           "nodes to the tree, and write the enlarged tree back as a new, harder instruction",
    system="You make instructions for AI assistants more complex in a controlled way, through their semantic trees.",
    template="""Take the instruction below through three steps.

1. Tree: parse it into a semantic tree, as in semantic parsing. The root is the main action the instruction asks \
for; every object, attribute, constraint and sub-task it names is a node under the node it belongs to. Write the \
tree with one node a line, indented by depth.
2. Expansion: add exactly {nodes} new nodes to the tree: new objects, attributes, constraints or sub-tasks, each \
attached where it makes sense. Write the enlarged tree the same way, marking each new node with a "+".
3. Text: write the enlarged tree back as one natural instruction that asks for everything in it. It must read as \
a request a user would make, not as a list of nodes.

Instruction: "{instruction}"

End your answer with the new instruction after the header "New instruction:", with nothing after it.""")
"""Tree-Instruct's augmentation (a JSON signal: ``{instruction}``): ``nodes`` more nodes, written back as text."""

_CODE_SECTION = re.compile(r"^[\s*#>_`-]*(task[ _]name|instruction|information|solution)[*_`]*\s*:[*_`]*[ \t]*",
                           flags=re.IGNORECASE | re.MULTILINE)


def format_code_task(task_name: str, instruction: str, information: str, solution: str) -> str:
    """A WaveCoder item as the generator writes it (and as the few-shot examples show it)."""
    return (f"Task name: {task_name}\nInstruction: {instruction}\nInformation: {information or 'none'}\n"
            f"Solution:\n{solution}")


def parse_code_task(raw: str) -> str:
    """A WaveCoder item from "Task name: / Instruction: / Information: / Solution:" sections (each header at the
    start of a line, markdown allowed; a section runs to the next header; the first of each kind counts), as JSON
    ``{instruction, input, output, task_name}`` (the information is the example's input; "none" is empty).
    Instruction and solution must not be empty."""
    parts = _sections(raw, _CODE_SECTION, ("instruction", "solution"), "information")
    return json.dumps({"instruction": parts["instruction"], "input": parts["information"], "output": parts["solution"],
                       "task_name": parts.get("task name", "")}, ensure_ascii=False)


WAVECODER_FIRST_GOOD = format_code_task(
    "Code generation", "Write a Python function that returns the n-th Fibonacci number, computed iteratively.",
    "n is a non-negative integer; fib(0) = 0 and fib(1) = 1.",
    "def fib(n: int) -> int:\n    # walk the sequence n steps, keeping the last two numbers\n    a, b = 0, 1\n"
    "    for _ in range(n):\n        a, b = b, a + b\n    return a")
"""The generator's first good example (ours); accepted items replace it as the run goes."""

WAVECODER_FIRST_BAD = format_code_task(
    "Code generation", "Make the function better.", "",
    "Here is a better version. It is faster because it uses caching:\n"
    "result = cache(fib)") + ("\nRejected because: the instruction states no programming language; the solution "
                               "is not only code; its logic is missing; it uses a library it does not import.")
"""The generator's first bad example (ours), with why the discriminator rejects it; rejected items replace it."""

WAVECODER_GENERATOR = Prompt(
    name="wavecoder_generator", version="1", parse=parse_code_task, kind="json", max_tokens=768,
    rubric="Yu et al. 2023, WaveCoder, LLM-based generator: from a piece of raw code, write an instruction item "
           "(task name, instruction, information, solution), guided by a good and a bad example",
    system="You turn raw source code into instruction data for training code assistants.",
    template="""Below is a piece of raw code from an open-source project. Use it as the material of one \
instruction item for a code assistant: choose a task that the code suggests (code generation, summarization, \
translation to another language, or repair), and write
- Task name: the kind of task;
- Instruction: what the user asks, naming the programming language;
- Information: what the assistant needs besides the instruction (the code to summarise, translate or repair, \
or the requirements), or "none";
- Solution: the answer, only code with comments inside it, complete, with every import it needs.

A good item:
{good}

A bad item (do not write like this):
{bad}

Raw code:
{code}

Answer in exactly this form:
Task name: <the task>
Instruction: <the instruction>
Information: <the information, or none>
Solution:
<the solution>""")
"""WaveCoder's generator (a JSON signal: ``{instruction, input, output, task_name}``)."""

__all__ = ["ALPAGASUS", "DEITA", "GENERATED_ANSWER", "HUMPBACK_BACKWARD", "HUMPBACK_BACKWARD_PROMPTED",
           "HUMPBACK_CURATION", "INDICATORS", "INSTAG", "LIFT_EXPAND", "LIFT_EXPECTED", "LIFT_POINTS", "LIFT_QUALITY",
           "MT_BENCH", "MT_REFERENCE", "MT_REFERENCE_CATEGORIES", "PAIRWISE", "TEGIT_DISCRIMINATOR", "TEGIT_TASK",
           "TREE_INSTRUCT_AUGMENT", "TREE_INSTRUCT_NODES", "WAVECODER_CHECKLIST", "WAVECODER_CHECKS",
           "WAVECODER_FIRST_BAD", "WAVECODER_FIRST_GOOD", "WAVECODER_GENERATOR", "format_code_task", "format_task",
           "parse_answer", "parse_backtranslated", "parse_checklist", "parse_code_task", "parse_intent_tags",
           "parse_lift_parts", "parse_new_instruction", "parse_node_count", "parse_numbered", "parse_rating",
           "parse_score_line", "parse_task", "parse_verdict", "parse_winner"]
