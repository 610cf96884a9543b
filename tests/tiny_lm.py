"""A tiny randomly initialised Llama with SmolLM2's tokenizer and chat template, built offline, and
a toy instruction set it can learn in a few steps (tests of fine-tuning and evaluation)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sft_select.settings import settings
from sft_select.storage import make_example
from sft_select.storage.examples import frame

WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "lemon", "melon", "grape", "mango", "peach"]


def build_tiny_llama(folder: Path) -> str:
    """A 2-layer, 32-wide Llama (random weights, seed 0) saved with the SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sft_select.tasks.backends.models import causal_lm_path

    tokenizer = AutoTokenizer.from_pretrained(causal_lm_path("smollm2-135m-instruct"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def repeat_word(word: str) -> dict[str, str]:
    """One toy record; the constant words of the answer are what a tiny model learns first."""
    return {"instruction": f"Repeat the word {word} three times.", "input": "",
            "output": f"Sure: {word}, {word}, {word}."}


def repeat_examples(words: list[str] = WORDS):
    """Canonical examples of the toy task."""
    return frame([make_example([{"role": "user", "content": r["instruction"]},
                                {"role": "assistant", "content": r["output"]}]) for r in map(repeat_word, words)])


@contextmanager
def tiny_home(root: Path, **env: str) -> Iterator[tuple[str, pytest.MonkeyPatch]]:
    """For a module-scoped fixture: a tiny base model under ``root/tiny``, then a store and a model
    cache of their own under ``root`` (and any other environment variables given), undone on exit.
    Yields the base model's folder and the patch (for more variables)."""
    base = build_tiny_llama(root / "tiny")  # before moving the model cache: it uses SmolLM2's tokenizer
    mp = pytest.MonkeyPatch()
    mp.setenv("SFT_SELECT_HOME", str(root / "home"))
    mp.setenv("SFT_SELECT_MODEL_CACHE", str(root / "models"))
    for k, v in env.items():
        mp.setenv(k, v)
    settings.cache_clear()
    try:
        yield base, mp
    finally:
        mp.undo()
        settings.cache_clear()
