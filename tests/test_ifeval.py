"""IFEval checkers: every instruction family with a response that follows it and one that does not;
the loose criterion, the four accuracies, and the real 541-prompt file."""

from __future__ import annotations

import json

import pytest

from sft_select.tasks.ifeval import (
    CHECKERS, IFEvalItem, accuracy, follows, loose_variants, read_ifeval, score, split_sentences,
)

GERMAN = "Das Wetter ist heute schön, und wir gehen am Nachmittag im Park spazieren."
ENGLISH = "The weather is lovely today, and we will take a walk in the park this afternoon."

# (instruction id, kwargs, a response that follows it, a response that does not)
CASES = [
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "This is VERY IMPORTANT news.", "This is VERY important news."),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"},
     "Only ONE shouted word here.", "TWO SHOUTED words here."),
    ("change_case:english_capital", {}, ENGLISH.upper(), ENGLISH),
    ("change_case:english_capital", {}, ENGLISH.upper(), GERMAN.upper()),
    ("change_case:english_lowercase", {}, ENGLISH.lower(), ENGLISH),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem about cats."},
     "write a poem about cats. Cats are soft and warm.", "Here is a poem about cats."),
    ("combination:two_responses", {}, "First answer.\n******\nSecond answer.", "First answer.\n******\nFirst answer."),
    ("combination:two_responses", {}, "A\n******\nB", "A\n******\n\n******\nB"),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Dear [name], see you at [address].", "Dear [name], see you soon."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."},
     "Main text.\n\nP.S. Bring snacks.", "Main text. Bring snacks."),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"},
     "Main text.\nP.P.S. One more thing.", "Main text.\nP.S. One more thing."),
    ("detectable_format:constrained_response", {}, "My answer is maybe.", "My answer is perhaps."),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', "Here is JSON: {\"a\": 1}"),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nIntro.\nSECTION 2\nBody.", "SECTION 1\nIntro and body."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", "* one\n* two\n- three"),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "Some *first part* and **second part**.", "Only *one part* and ** ** empty."),
    ("detectable_format:title", {}, "<<My Title>>\nText.", "My Title\nText with << >> blank."),
    ("keywords:existence", {"keywords": ["river", "stone"]}, "A Stone by the river.", "A stone by the lake."),
    ("keywords:forbidden_words", {"forbidden_words": ["bad", "awful"]},
     "This is badly worded but fine.", "This is an Awful result."),
    ("keywords:frequency", {"keyword": "cat", "frequency": 3, "relation": "at least"},
     "cat Cat CAT", "cat cat dog"),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "less than"}, "one cat", "cat and cat"),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"},
     "Zebras zigzag.", "Zebras run."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "less than"},
     "A zebra.", "Zebras zigzag."),
    ("language:response_language", {"language": "de"}, GERMAN, ENGLISH),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "then"},
     "First.\n\n\"Then, second.\n\nThird.", "First.\n\nNow second.\n\nThird."),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "then"},
     "First.\n\nThen second.\n\nThird.", "First.\n\nThen second."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, "One.\n***\nTwo.\n***\nThree.",
     "One.\n***\nTwo."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "One.\n***\nTwo.", "One.\n***\n***\nTwo."),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "Dr. Smith arrived. He sat down.", "One. Two. Three."),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"},
     "One! Two? Three.", "Mr. Brown paid $3.50 for it. Done."),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"},
     "one two three four five", "one two three four"),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"},
     "one two three four", "one two three four five"),
    ("punctuation:no_comma", {}, "No commas here.", "Commas, here."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     "That is all. Any other questions?\n", "Any other questions? That is all."),
    ("startend:quotation", {}, '"Wrapped in quotes."', 'Not "wrapped" in quotes.'),
]


def test_every_checker_family_has_cases():
    assert {c[0] for c in CASES} == set(CHECKERS)


@pytest.mark.parametrize(("instruction_id", "kwargs", "good", "bad"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_checker_positive_and_negative(instruction_id, kwargs, good, bad):
    assert follows(instruction_id, kwargs, good) is True
    assert follows(instruction_id, kwargs, bad) is False


def test_empty_response_follows_nothing():
    assert follows("punctuation:no_comma", {}, "   \n") is False


def test_none_arguments_are_dropped():
    assert follows("punctuation:no_comma", {"num_words": None}, "fine") is True


def test_sentence_splitter_skips_abbreviations_initials_and_decimals():
    text = "Dr. Smith met J. R. Tolkien at 3.5 p.m. On Monday. It rained! Really? \"Yes.\" Then e.g. nothing."
    assert split_sentences(text) == ["Dr. Smith met J. R. Tolkien at 3.5 p.m. On Monday.", "It rained!", "Really?",
                                     "\"Yes.\"", "Then e.g. nothing."]


def test_loose_variants_drop_first_last_lines_and_asterisks():
    variants = loose_variants("Sure!\n*body*\nHope this helps.")
    assert variants[:4] == ["Sure!\n*body*\nHope this helps.", "*body*\nHope this helps.", "Sure!\n*body*", "*body*"]
    assert variants[7] == "body"


def test_loose_accepts_what_strict_rejects_and_accuracies():
    quoted = IFEvalItem(key=1, prompt="p", instruction_id_list=["startend:quotation", "punctuation:no_comma"],
                        kwargs=[{}, {}])
    # A preamble line breaks the quotation strictly; removing the first line fixes it loosely.
    s1 = score(quoted, 'Here you go:\n"All wrapped up."')
    assert s1.strict == [False, True] and s1.loose == [True, True]
    s2 = score(quoted, '"Wrapped, but with a comma."')
    assert s2.strict == [True, False] and s2.loose == [True, False]
    acc = accuracy([s1, s2])
    assert acc == {"prompt_strict": 0.0, "instruction_strict": 0.5, "prompt_loose": 0.5, "instruction_loose": 0.75}


def test_unknown_instruction_id_is_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"key": 1, "prompt": "p", "instruction_id_list": ["detectable_format:haiku"],
                                "kwargs": [{}]}) + "\n")
    with pytest.raises(ValueError, match="haiku"):
        read_ifeval(path)


def test_the_541_prompts_all_have_checkers(shared_data):
    items = read_ifeval(shared_data / "eval" / "ifeval_541.jsonl")
    assert len(items) == 541
    assert {i for item in items for i in item.instruction_id_list} == set(CHECKERS)
    assert len(read_ifeval(shared_data / "eval" / "ifeval_541.jsonl", limit=7)) == 7
    # Echoing the prompt follows some instructions (e.g. keyword existence) but far from all.
    acc = accuracy([score(item, item.prompt) for item in items])
    assert 0.05 < acc["instruction_strict"] < 0.8
    assert acc["prompt_loose"] >= acc["prompt_strict"] and acc["instruction_loose"] >= acc["instruction_strict"]
