"""fine-tune-seed-model on a tiny randomly initialised Llama (SmolLM2's tokenizer, built offline):
answer-only masks, loss going down, the adapter written and loaded, the cache, and resuming a run
killed with SIGKILL after its first checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sft_select.settings import settings
from tiny_lm import build_tiny_llama, repeat_examples

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> str:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def model_cache(tmp_path, monkeypatch) -> Path:
    """Fine-tuned models of this test go to their own folder."""
    monkeypatch.setenv("SFT_SELECT_MODEL_CACHE", str(tmp_path / "models"))
    settings.cache_clear()
    yield tmp_path / "models"
    settings.cache_clear()


def examples():
    return repeat_examples()


def test_assistant_mask_covers_every_assistant_turn_and_nothing_else(tiny_base):
    from transformers import AutoTokenizer

    from sft_select.tasks.finetune import assistant_tokens, resolve_template

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Add 2+2"},
                    {"role": "assistant", "content": "4"}]
    assert resolve_template(tokenizer, "auto") == "chat"
    ids, mask = assistant_tokens(tokenizer, conversation)
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == "Hello!<|im_end|>\n4<|im_end|>\n"
    assert "Be brief." in tokenizer.decode(ids) and "Add 2+2" in tokenizer.decode([t for t, m in zip(ids, mask)
                                                                                      if not m])

    assert resolve_template(tokenizer, "alpaca") == "alpaca"
    ids, mask = assistant_tokens(tokenizer, conversation[1:3])
    text = tokenizer.decode(ids)
    assert text.startswith(tokenizer.bos_token + "Below is an instruction") and "### Instruction:\nHi there" in text
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == "Hello!" + tokenizer.eos_token


def test_recipe_hash_and_key(tiny_base, tmp_path):
    import shutil

    from sft_select.tasks.backends.models import model_identity
    from sft_select.tasks.finetune import Recipe, finetune_key

    assert Recipe(save_steps=7).hash() == Recipe().hash()
    assert Recipe(lr=1e-3).hash() != Recipe().hash()
    ex = examples()
    assert finetune_key(ex, tiny_base, Recipe()) == finetune_key(ex.reverse(), tiny_base, Recipe())
    assert finetune_key(ex, tiny_base, Recipe()) != finetune_key(ex.head(5), tiny_base, Recipe())
    copy = shutil.copytree(tiny_base, tmp_path / "copy")  # content, not path, identifies a local base
    assert model_identity(str(copy)) == model_identity(tiny_base)
    assert model_identity("smollm2-135m-instruct") == "smollm2-135m-instruct"


def test_lora_finetune_lowers_loss_writes_adapter_that_loads_and_is_cached(tiny_base, model_cache):
    import torch

    from sft_select.tasks.finetune import Recipe, finetune, load_finetuned

    recipe = Recipe(max_steps=24, batch_size=4, lr=2e-2, warmup_ratio=0.0, logging_steps=4, save_steps=100)
    seen: list[tuple[int, int]] = []
    ref = finetune(examples(), tiny_base, recipe, progress=lambda step, total: seen.append((step, total)))
    assert ref.steps == 24 and ref.resumed_from_step is None and ref.template == "chat" and not ref.full
    assert seen == [(s, 24) for s in range(4, 25, 4)]  # progress at every logging step
    assert ref.loss_last < ref.loss_first - 0.1, ref.loss_history
    folder = Path(ref.path)
    assert folder.parent == model_cache / "finetuned"
    assert (folder / "adapter_config.json").exists() and not (folder / "model.safetensors").exists()
    assert not folder.with_name(folder.name + ".partial").exists()  # checkpoints are cleared when done

    again = finetune(examples(), tiny_base, recipe)  # the finished folder is reused: same result, no training
    assert again == ref

    model, tokenizer = load_finetuned(ref)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Repeat the word fig three times."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        tuned_logits = model(**prompt).logits
        base_logits = base(**prompt).logits
    assert not torch.allclose(tuned_logits, base_logits, atol=1e-4)  # the adapter was merged in


def test_full_finetune_saves_full_weights(tiny_base, model_cache):
    from sft_select.tasks.finetune import Recipe, finetune, load_finetuned

    ref = finetune(examples(), tiny_base, Recipe(full=True, max_steps=6, batch_size=4, lr=1e-3, logging_steps=2))
    assert ref.full and (Path(ref.path) / "model.safetensors").exists()
    assert ref.loss_last < ref.loss_first
    model, _ = load_finetuned(ref)
    assert not hasattr(model, "peft_config")


_CHILD = """
import sys
import polars as pl
from sft_select.tasks.finetune import Recipe, finetune
examples = pl.read_parquet(sys.argv[1])
finetune(examples, sys.argv[2], Recipe.model_validate_json(sys.argv[3]))
"""


def test_killed_finetune_resumes_from_its_last_checkpoint(tiny_base, model_cache, tmp_path):
    from sft_select.tasks.finetune import Recipe, finetune, finetune_key, finetuned_dir

    recipe = Recipe(max_steps=40, batch_size=4, lr=1e-2, save_steps=3, logging_steps=1)
    ex = examples()
    data = tmp_path / "examples.parquet"
    ex.write_parquet(data)
    work = finetuned_dir(finetune_key(ex, tiny_base, recipe)).with_name(
        finetuned_dir(finetune_key(ex, tiny_base, recipe)).name + ".partial")
    env = {**os.environ, "SFT_SELECT_MODEL_CACHE": str(model_cache), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(data), tiny_base, recipe.model_dump_json()],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while not list(work.glob("checkpoint-*/trainer_state.json")):
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.02)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    checkpoints = sorted(int(p.parent.name.split("-")[1]) for p in work.glob("checkpoint-*/trainer_state.json"))
    assert checkpoints and checkpoints[-1] < 40  # killed mid-run

    ref = finetune(ex, tiny_base, recipe)
    assert ref.resumed_from_step == checkpoints[-1]
    assert ref.steps == 40
    steps_logged = [step for step, _ in ref.loss_history]
    assert steps_logged[0] == 1 and steps_logged[-1] == 40  # the history carried over from the checkpoint
    state = json.loads((Path(ref.path) / "finetune.json").read_text())
    assert state["resumed_from_step"] == checkpoints[-1]


def test_prefect_task_is_cached_on_the_finetune_key(tiny_base, model_cache, prefect_api):
    """The first run trains; the second finds the finished folder (no training) and stores its
    result under the key; from then on Prefect answers Cached. A deleted folder is never masked by
    a cached reference: without the folder there is no cache key."""
    import shutil

    from prefect import flow

    from sft_select.tasks.finetune import Recipe, finetune_task

    recipe = Recipe(max_steps=2, batch_size=4, save_steps=100)

    @flow
    def tune():
        state = finetune_task(examples(), tiny_base, recipe, return_state=True)
        return state.name, state.result()

    runs = [tune() for _ in range(3)]
    assert [name for name, _ in runs] == ["Completed", "Completed", "Cached"]
    assert runs[0][1] == runs[1][1] == runs[2][1] and runs[0][1].steps == 2

    shutil.rmtree(runs[0][1].path)
    name, ref = tune()
    assert name == "Completed" and (Path(ref.path) / "finetune.json").exists()


def test_auto_precision_is_what_this_cpu_runs_fast(tmp_path, monkeypatch):
    """'auto' takes bf16 only where a measured probe finds it at least as fast as float32 (on an
    AVX2-only CPU bf16 is eighty times slower), remembers the probe, and follows what it remembers."""
    import json

    from sft_select.settings import settings
    from sft_select.tasks.backends.precision import _cpu_name, bf16_is_fast
    from sft_select.tasks.finetune import Recipe, _precision

    monkeypatch.setenv("SFT_SELECT_MODEL_CACHE", str(tmp_path))
    settings.cache_clear()
    bf16_is_fast.cache_clear()
    try:
        chosen, device = _precision(Recipe(precision="auto"))
        [(key, rates)] = json.loads((tmp_path / "cpu_precision.json").read_text()).items()
        assert device == "cpu" and key.startswith(_cpu_name()) and rates["float32"] > 0 and rates["bfloat16"] > 0
        assert chosen == (rates["bfloat16"] >= rates["float32"])
        assert _precision(Recipe(precision="fp32")) == (False, "cpu")
        for bf16_rate, expected in ((1.2, False), (400.0, True)):  # the remembered probe decides
            (tmp_path / "cpu_precision.json").write_text(json.dumps({key: {"float32": 98.0, "bfloat16": bf16_rate}}))
            bf16_is_fast.cache_clear()
            assert _precision(Recipe(precision="auto")) == (expected, "cpu")
    finally:
        settings.cache_clear()
        bf16_is_fast.cache_clear()
