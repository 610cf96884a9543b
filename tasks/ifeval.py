"""IFEval: verifiable instructions scored by rules (Zhou et al. 2023, "Instruction-Following
Evaluation for Large Language Models", arXiv:2311.07911).

Each prompt carries a list of instruction ids with their arguments (``instruction_id_list``,
``kwargs``). A checker decides from the response text alone whether one instruction was followed.
Four accuracies, as in the paper:

- prompt-level strict: fraction of prompts whose every instruction is followed;
- instruction-level strict: fraction of all instructions followed;
- loose variants of both: an instruction counts as followed when any of eight transformed responses
  follows it: the response as is, with its first line removed, its last line removed, both, and
  each of those four with every markdown ``*`` removed (the paper's remedy for false negatives
  caused by a preamble line, a closing remark or emphasis markup).

A response that is empty (after stripping whitespace) follows nothing.

The checkers cover the 25 instruction ids of the 541-prompt IFEval set and follow the published
definitions (comparison relations "at least" = ``>=``, "less than" = ``<``; exact counts where the
instruction says "exactly"). Written for this project; the maintained implementations (Google's
``instruction_following_eval``, its copies in lm-eval and if-verifiable) load NLTK's punkt model at
run time, which is downloaded from outside the package registries and so cannot be had offline
here. Deviations from Google's reference, all in tokenisation:

- sentences are counted by a rule-based splitter (terminal ``.``/``!``/``?`` followed by space and a
  non-lowercase character, skipping common abbreviations, initials and decimals) instead of punkt;
- capital words are whole words (``\\w+`` with inner apostrophes/hyphens) written in upper case,
  where the reference counts NLTK word tokens (which splits "DON'T" into two);
- words are ``\\w+`` runs, as in the reference.

Language identification uses ``langdetect`` (as the reference does), seeded for determinism; when
it cannot decide (no letters), the language check passes, as in the reference.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

Checker = Callable[..., bool]
CHECKERS: dict[str, Checker] = {}


def checker(instruction_id: str) -> Callable[[Checker], Checker]:
    """Register a checker ``(response, **kwargs) -> bool`` under an IFEval instruction id."""

    def register(fn: Checker) -> Checker:
        CHECKERS[instruction_id] = fn
        return fn

    return register


# -- text units -------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+")
_CAPITAL_WORD = re.compile(r"\w+(?:['’-]\w+)*")
_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "inc", "ltd", "co", "corp",
    "no", "fig", "approx", "dept", "est", "u.s", "u.k", "a.m", "p.m", "jan", "feb", "mar", "apr", "jun", "jul",
    "aug", "sep", "sept", "oct", "nov", "dec", "mt", "ft", "vol", "al",
}
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")


def count_words(text: str) -> int:
    return len(_WORD.findall(text))


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: a run of ``.``, ``!`` or ``?`` (with closing quotes/brackets) ends a
    sentence when whitespace and a character that is not a lower-case letter follow, unless it is
    the period of an abbreviation, an initial or a number."""
    text = text.strip()
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        end = m.end()
        rest = text[end:].lstrip()
        if rest and rest[0].islower():
            continue
        if m.group().startswith(".") and len(m.group().rstrip("\"'”’)]")) == 1:
            before = text[start:m.start()].split()
            last = before[-1].lower().strip("(\"'") if before else ""
            if last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha()) or (rest[:1].isdigit() and
                                                                                    last[-1:].isdigit()):
                continue
        sentence = text[start:end].strip()
        if sentence:
            out.append(sentence)
        start = end
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def detect_language(text: str) -> str | None:
    """ISO 639-1 code from langdetect (seeded), or None when it cannot tell."""
    from langdetect import DetectorFactory, LangDetectException, detect

    DetectorFactory.seed = 0
    try:
        return detect(text)
    except LangDetectException:
        return None


def _compare(count: int, relation: str, threshold: int) -> bool:
    if relation == "at least":
        return count >= threshold
    if relation == "less than":
        return count < threshold
    raise ValueError(f"unknown relation {relation!r} (expected 'at least' or 'less than')")


# -- checkers, one per instruction id ------------------------------------------------------------------


@checker("change_case:capital_word_frequency")
def capital_word_frequency(response: str, *, capital_frequency: int, capital_relation: str) -> bool:
    """Words written fully in capitals: count compared with ``capital_frequency``."""
    capitals = sum(1 for w in _CAPITAL_WORD.findall(response) if w.isupper())
    return _compare(capitals, capital_relation, capital_frequency)


@checker("change_case:english_capital")
def english_capital(response: str) -> bool:
    """The whole response is in English and in capital letters."""
    return response.isupper() and detect_language(response) in ("en", None)


@checker("change_case:english_lowercase")
def english_lowercase(response: str) -> bool:
    """The whole response is in English and in lower-case letters."""
    return response.islower() and detect_language(response) in ("en", None)


@checker("combination:repeat_prompt")
def repeat_prompt(response: str, *, prompt_to_repeat: str) -> bool:
    """The response begins with the request, repeated word for word (case-insensitive)."""
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


@checker("combination:two_responses")
def two_responses(response: str) -> bool:
    """Two different responses separated by six asterisks (``******``)."""
    parts = response.split("******")
    inner_empty = any(not p.strip() for p in parts[1:-1])
    answers = [p.strip() for p in parts if p.strip()]
    return not inner_empty and len(answers) == 2 and answers[0] != answers[1]


@checker("detectable_content:number_placeholders")
def number_placeholders(response: str, *, num_placeholders: int) -> bool:
    """At least ``num_placeholders`` square-bracket placeholders such as ``[address]``."""
    return len(re.findall(r"\[.*?\]", response)) >= num_placeholders


@checker("detectable_content:postscript")
def postscript(response: str, *, postscript_marker: str) -> bool:
    """A postscript starting with the marker (``P.S.``, ``P.P.S``; spaces after the periods allowed)."""
    marker = postscript_marker.strip().lower()
    if marker == "p.p.s":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "p.s.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker) + r".*$"
    return re.search(pattern, response.lower(), flags=re.MULTILINE) is not None


@checker("detectable_format:constrained_response")
def constrained_response(response: str) -> bool:
    """Answers with one of the fixed options 'My answer is yes./no./maybe.'."""
    return any(option in response for option in ("My answer is yes.", "My answer is no.", "My answer is maybe."))


@checker("detectable_format:json_format")
def json_format(response: str) -> bool:
    """The whole response is valid JSON (a markdown code fence around it is allowed)."""
    text = response.strip()
    text = re.sub(r"^```(?:json)?", "", text, flags=re.IGNORECASE).strip()
    text = re.sub(r"```$", "", text).strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@checker("detectable_format:multiple_sections")
def multiple_sections(response: str, *, section_spliter: str, num_sections: int) -> bool:
    """At least ``num_sections`` sections, each starting with '<spliter> <number>' (e.g. 'SECTION 1')."""
    parts = re.split(r"\s?" + re.escape(section_spliter) + r"\s?\d+\s?", response)
    return len(parts) - 1 >= num_sections


@checker("detectable_format:number_bullet_lists")
def number_bullet_lists(response: str, *, num_bullets: int) -> bool:
    """Exactly ``num_bullets`` markdown bullet points (lines starting with ``* `` or ``-``)."""
    stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


@checker("detectable_format:number_highlighted_sections")
def number_highlighted_sections(response: str, *, num_highlights: int) -> bool:
    """At least ``num_highlights`` non-empty sections highlighted with markdown, ``*x*`` or ``**x**``."""
    single = [h for h in re.findall(r"\*[^\n\*]*\*", response) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", response) if h[2:-2].strip()]
    return len(single) + len(double) >= num_highlights


@checker("detectable_format:title")
def title(response: str) -> bool:
    """A non-empty title in double angular brackets, ``<<title>>``."""
    return any(t[2:-2].strip() for t in re.findall(r"<<[^\n]+>>", response))


@checker("keywords:existence")
def keywords_existence(response: str, *, keywords: list[str]) -> bool:
    """Every keyword appears (case-insensitive)."""
    return all(re.search(re.escape(k), response, flags=re.IGNORECASE) for k in keywords)


@checker("keywords:forbidden_words")
def forbidden_words(response: str, *, forbidden_words: list[str]) -> bool:
    """None of the words appears as a whole word (case-insensitive)."""
    return not any(re.search(r"\b" + re.escape(w) + r"\b", response, flags=re.IGNORECASE) for w in forbidden_words)


@checker("keywords:frequency")
def keyword_frequency(response: str, *, keyword: str, frequency: int, relation: str) -> bool:
    """Occurrences of ``keyword`` (case-insensitive) compared with ``frequency``."""
    return _compare(len(re.findall(re.escape(keyword), response, flags=re.IGNORECASE)), relation, frequency)


@checker("keywords:letter_frequency")
def letter_frequency(response: str, *, letter: str, let_frequency: int, let_relation: str) -> bool:
    """Occurrences of one letter (case-insensitive) compared with ``let_frequency``."""
    return _compare(Counter(response.lower())[letter.lower()], let_relation, let_frequency)


@checker("language:response_language")
def response_language(response: str, *, language: str) -> bool:
    """The response is in ``language`` (ISO 639-1), by langdetect."""
    return detect_language(response) in (language, None)


@checker("length_constraints:nth_paragraph_first_word")
def nth_paragraph_first_word(response: str, *, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    """Exactly ``num_paragraphs`` paragraphs separated by blank lines (``\\n\\n``), and paragraph
    ``nth_paragraph`` (1-based) starts with ``first_word`` (case-insensitive, punctuation ignored)."""
    paragraphs = re.split(r"\n\n", response)
    count = sum(1 for p in paragraphs if p.strip())
    if nth_paragraph > count or nth_paragraph > len(paragraphs):
        return False
    paragraph = paragraphs[nth_paragraph - 1].strip()
    if not paragraph:
        return False
    word = re.match(r"[^.,?!'\"]*", paragraph.split()[0].lstrip("'\"")).group().lower()
    return count == num_paragraphs and word == first_word.strip().lower()


@checker("length_constraints:number_paragraphs")
def number_paragraphs(response: str, *, num_paragraphs: int) -> bool:
    """Exactly ``num_paragraphs`` paragraphs separated by the markdown divider ``***``."""
    paragraphs = re.split(r"\s?\*\*\*\s?", response)
    if any(not p.strip() for p in paragraphs[1:-1]):
        return False
    return sum(1 for p in paragraphs if p.strip()) == num_paragraphs


@checker("length_constraints:number_sentences")
def number_sentences(response: str, *, num_sentences: int, relation: str) -> bool:
    """Number of sentences compared with ``num_sentences``."""
    return _compare(len(split_sentences(response)), relation, num_sentences)


@checker("length_constraints:number_words")
def number_words(response: str, *, num_words: int, relation: str) -> bool:
    """Number of words compared with ``num_words``."""
    return _compare(count_words(response), relation, num_words)


@checker("punctuation:no_comma")
def no_comma(response: str) -> bool:
    """No comma anywhere."""
    return "," not in response


@checker("startend:end_checker")
def end_checker(response: str, *, end_phrase: str) -> bool:
    """The response ends with ``end_phrase`` exactly (case-insensitive; surrounding quotes ignored)."""
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


@checker("startend:quotation")
def quotation(response: str) -> bool:
    """The whole response is wrapped in double quotation marks."""
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


# -- prompts and scores ------------------------------------------------------------------------------


class IFEvalItem(BaseModel):
    """One IFEval prompt with its verifiable instructions."""

    key: int
    prompt: str
    instruction_id_list: list[str]
    kwargs: list[dict[str, Any]]


class IFEvalScore(BaseModel):
    """Whether each instruction of one prompt was followed, strictly and loosely."""

    key: int
    instruction_id_list: list[str]
    strict: list[bool]
    loose: list[bool]


def read_ifeval(path: str | Path, limit: int | None = None) -> list[IFEvalItem]:
    """The prompts of an IFEval JSONL file (``key``, ``prompt``, ``instruction_id_list``, ``kwargs``);
    the first ``limit`` when given. Unknown instruction ids are an error here, not at scoring time."""
    items = []
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                items.append(IFEvalItem.model_validate_json(line))
            if limit is not None and len(items) >= limit:
                break
    unknown = sorted({i for item in items for i in item.instruction_id_list} - CHECKERS.keys())
    if unknown:
        raise ValueError(f"{Path(path).name}: no checker for instruction ids {unknown}")
    return items


def follows(instruction_id: str, kwargs: dict[str, Any], response: str) -> bool:
    """Strict check of one instruction (arguments that are None are dropped, as in the data files)."""
    if not response.strip():
        return False
    return CHECKERS[instruction_id](response, **{k: v for k, v in kwargs.items() if v is not None})


def loose_variants(response: str) -> list[str]:
    """The eight responses of the loose criterion: as is, without the first line, without the last
    line, without both, and each of those with markdown asterisks removed."""
    lines = response.split("\n")
    cut = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return cut + [r.replace("*", "") for r in cut]


def score(item: IFEvalItem, response: str) -> IFEvalScore:
    """Strict and loose verdicts for each instruction of ``item``."""
    variants = loose_variants(response)
    strict, loose = [], []
    for instruction_id, kwargs in zip(item.instruction_id_list, item.kwargs):
        strict.append(follows(instruction_id, kwargs, response))
        loose.append(strict[-1] or any(follows(instruction_id, kwargs, v) for v in variants[1:]))
    return IFEvalScore(key=item.key, instruction_id_list=item.instruction_id_list, strict=strict, loose=loose)


def accuracy(scores: list[IFEvalScore]) -> dict[str, float]:
    """The paper's four accuracies: ``prompt_strict``, ``instruction_strict``, ``prompt_loose``,
    ``instruction_loose``."""
    if not scores:
        raise ValueError("no scores")
    out = {}
    for mode in ("strict", "loose"):
        verdicts = [getattr(s, mode) for s in scores]
        out[f"prompt_{mode}"] = sum(all(v) for v in verdicts) / len(verdicts)
        out[f"instruction_{mode}"] = sum(map(sum, verdicts)) / sum(map(len, verdicts))
    return out
