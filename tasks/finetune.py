"""fine-tune-seed-model: supervised fine-tuning of a causal LM on a selection of examples.

The training objective is the usual SFT loss, the mean cross-entropy over the assistant tokens
only::

    L = - (1 / |A|) * sum_{t in A} log p(x_t | x_<t)

where ``A`` is the set of positions inside assistant turns (every assistant turn of a multi-turn
conversation, including the template's end-of-turn token, so the model learns to stop); system
and user tokens are context and carry label -100.

Text is rendered with the base model's own chat template; a base model without one (or any model
with ``Recipe.template="alpaca"``) gets the Stanford Alpaca prompt format, written into the saved
tokenizer as its chat template so that evaluation renders prompts exactly as training did.

Training runs through TRL's ``SFTTrainer`` (no hand-written loop): LoRA adapters on every linear
layer by default (peft), full fine-tuning with ``Recipe.full``; length-grouped batches by default,
TRL's best-fit-decreasing packing with ``Recipe.batching="packing"``. bf16 mixed precision where
the device runs it fast (``Recipe.precision="auto"``: a GPU that supports it, a CPU by a measured
probe; some CPUs run bf16 eighty times slower than float32), or where the recipe asks for it.

Caching: the result is stored under ``settings().model_cache / "finetuned" / <key>``, with
``key = sha256(selection fingerprint, base model identity, recipe hash)``; a finished folder is
reused as it is. Checkpoints go to ``<key>.partial/`` every ``Recipe.save_steps`` optimizer steps,
and a run that was killed resumes from its last complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal

import polars as pl
from filelock import FileLock
from prefect import task
from prefect.context import TaskRunContext
from pydantic import BaseModel, ConfigDict, Field, computed_field

from sft_select.settings import settings
from sft_select.storage import NotFilled, fingerprint
from sft_select.tasks.backends.loss_engine import ALPACA_PREAMBLE, ALPACA_RESPONSE
from sft_select.tasks.backends.models import causal_lm_path, finetuned_dir, load_causal_lm, model_identity
from sft_select.tasks.signal_task import planning, progress_artifact

log = logging.getLogger("sft_select")

# Stanford Alpaca's prompt format (Taori et al. 2023; the preamble and headers are the ones the loss
# engine uses), as a chat template: the preamble stands in for a system turn, each user turn becomes
# "### Instruction:", each answer follows "### Response:" directly and ends with EOS, as in Alpaca's
# training code. Canonical examples already fold an Alpaca ``input`` into the user turn, so the
# no-input form is used throughout (a deviation from Alpaca's "### Input:" section).
ALPACA_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}{{ messages[0]['content'] }}"
    "{%- else -%}" + ALPACA_PREAMBLE + "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{ '\\n\\n### Instruction:\\n' + m['content'] + '\\n\\n" + ALPACA_RESPONSE + "' }}"
    "{%- elif m['role'] == 'assistant' -%}{{ m['content'] + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

FINISHED = "finetune.json"  # written last into a finished folder: its presence means "done"


class Recipe(BaseModel):
    """How to fine-tune. Every field but ``save_steps`` and ``logging_steps`` is part of the cache key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: float = Field(3.0, gt=0, description="passes over the selection (ignored when max_steps is set)")
    lr: float = Field(2e-4, gt=0, description="peak learning rate (cosine decay, linear warm-up)")
    batch_size: int = Field(8, ge=1, description="sequences per device step")
    grad_accum: int = Field(1, ge=1, description="device steps per optimizer step")
    max_length: int = Field(1024, ge=16, description="tokens per sequence; longer ones are truncated")
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    full: bool = Field(False, description="full fine-tuning instead of LoRA")
    seed: int = 42
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batching: Literal["length_grouped", "packing"] = "length_grouped"
    template: Literal["auto", "chat", "alpaca"] = Field(
        "auto", description="auto: the model's chat template when it has one, else Alpaca")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast where this device runs bf16 at least as fast as fp32 (a GPU "
                            "that supports it; a CPU by a short measured probe), fp32 otherwise")
    save_steps: int = Field(50, ge=1, description="checkpoint every this many optimizer steps")
    logging_steps: int = Field(5, ge=1)

    def hash(self) -> str:
        """Hash of the fields that change the trained weights."""
        fields = self.model_dump(exclude={"save_steps", "logging_steps"})
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


class FinetunedRef(BaseModel):
    """A finished fine-tuned model (LoRA adapter or full weights) in the model cache."""

    key: str
    base: str
    base_id: str
    recipe: Recipe
    full: bool
    template: Literal["chat", "alpaca"]
    examples: int
    selection_fingerprint: str
    steps: int
    resumed_from_step: int | None = None
    train_loss: float | None = Field(None, description="mean training loss over the run (Trainer's train_loss)")
    loss_first: float | None = None
    loss_last: float | None = None
    loss_history: list[tuple[int, float]] = Field(default_factory=list, description="(step, loss), at most 50")
    runtime_s: float = 0.0
    device: str = "cpu"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def path(self) -> str:
        """Where the weights are (derived from the model cache, so the reference survives a move)."""
        return str(finetuned_dir(self.key))


def finetune_key(examples: pl.DataFrame, base: str, recipe: Recipe) -> str:
    """sha256 of (selection fingerprint, base model identity, recipe hash)."""
    parts = [fingerprint(examples["uid"]), model_identity(base), recipe.hash()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


# -- rendering and masks ---------------------------------------------------------------------------


def resolve_template(tokenizer: Any, template: str) -> Literal["chat", "alpaca"]:
    """The template to train with: ``chat`` when asked for, or (``auto``) when the tokenizer has a
    chat template; ``alpaca`` otherwise, which is then set as the tokenizer's chat template."""
    if template == "chat" and not tokenizer.chat_template:
        raise ValueError("Recipe.template='chat' but the base model's tokenizer has no chat template")
    chosen: Literal["chat", "alpaca"] = "chat" if template == "chat" or (
        template == "auto" and tokenizer.chat_template) else "alpaca"
    if chosen == "alpaca":
        tokenizer.chat_template = ALPACA_CHAT_TEMPLATE
    return chosen


def _ids(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def assistant_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(input_ids, assistant_mask) of one conversation under the tokenizer's chat template.

    Assistant turn ``i`` spans the tokens between the rendering of ``messages[:i]`` with the
    generation prompt and the rendering of ``messages[:i+1]``, so the mask is exact for any template
    whose renderings of a conversation's prefixes are prefixes of its rendering (ChatML, Llama 3,
    Gemma, Alpaca); where one is not, the span starts where the two token sequences diverge.
    """
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    input_ids = _ids(tokenizer, messages)
    mask = [0] * len(input_ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _common_prefix(_ids(tokenizer, messages[:i], generation_prompt=True), input_ids)
        end = _common_prefix(_ids(tokenizer, messages[: i + 1]), input_ids)
        mask[start:end] = [1] * (end - start)
    return input_ids, mask


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_selection(tokenizer: Any, examples: pl.DataFrame, max_length: int):
    """A ``datasets.Dataset`` of ``input_ids`` and ``labels`` (-100 outside assistant turns),
    truncated to ``max_length``; conversations with no assistant token left are dropped."""
    from datasets import Dataset

    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for messages in examples["messages"].to_list():
        ids, mask = assistant_tokens(tokenizer, messages)
        ids, mask = ids[:max_length], mask[:max_length]
        if not any(mask):
            continue
        rows["input_ids"].append(ids)
        rows["labels"].append([t if keep else -100 for t, keep in zip(ids, mask)])
    if not rows["input_ids"]:
        raise ValueError("no example has an assistant answer within max_length tokens")
    return Dataset.from_dict(rows)


# -- training --------------------------------------------------------------------------------------


def last_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint whose trainer state was written (it is written last, so a checkpoint
    that a kill interrupted is skipped)."""

    def complete(p: Path) -> bool:
        try:
            json.loads((p / "trainer_state.json").read_text())
            return True
        except (OSError, ValueError):
            return False

    found = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and complete(p)]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _precision(recipe: Recipe) -> tuple[bool, str]:
    """(bf16, device): ``auto`` takes bf16 where this device runs it at least as fast as float32
    (measured on the CPU: on some CPUs of one kind it is eighty times slower); ``bf16`` asks for it
    regardless."""
    import torch

    from sft_select.tasks.backends.precision import bf16_is_fast

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if recipe.precision == "auto":
        bf16 = bf16_is_fast(device)
        log.info("fine-tuning on %s in %s (precision auto)", device, "bf16 autocast" if bf16 else "float32")
        return bf16, device
    return recipe.precision == "bf16" and (device == "cpu" or torch.cuda.is_bf16_supported()), device


def _loss_summary(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    points = [(int(h["step"]), float(h["loss"])) for h in log_history if "loss" in h and "step" in h]
    if len(points) > 50:  # keep the first, the last and evenly spaced points between
        idx = sorted({round(i * (len(points) - 1) / 49) for i in range(50)})
        points = [points[i] for i in idx]
    train_loss = next((float(h["train_loss"]) for h in reversed(log_history) if "train_loss" in h), None)
    return {"loss_history": points, "loss_first": points[0][1] if points else None,
            "loss_last": points[-1][1] if points else None, "train_loss": train_loss}


def finetune(examples: pl.DataFrame, base: str = "smollm2-135m-instruct", recipe: Recipe | None = None,
             progress: Callable[[int, int], None] | None = None) -> FinetunedRef:
    """Plain function: fine-tune ``base`` on ``examples`` (canonical frame; uses ``uid`` and
    ``messages``) with ``recipe``; returns the cached result when there is one, resumes a killed run.
    Every ``recipe.logging_steps`` steps the loss is logged and ``progress(step, total_steps)`` called.

    ``base`` is anything ``causal_lm_path`` resolves: an embedded name (``smollm2-135m-instruct``,
    ``gemma-3-270m``), a local folder, or a hub id where there is a network.
    """
    recipe = recipe or Recipe()
    if examples.is_empty():
        raise ValueError("cannot fine-tune on an empty selection")
    examples = examples.sort("uid")  # one order per content: one key is one training run
    key = finetune_key(examples, base, recipe)
    out = finetuned_dir(key)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / FINISHED).exists():
            log.info("fine-tuned model %s found in the cache", key)
            rebase_adapter(out, base)
            return FinetunedRef.model_validate_json((out / FINISHED).read_text())
        if planning() is not None:
            raise NotFilled(f"fine-tuning {base} on {examples.height} examples: a dry run stops before training")
        ref = _train(examples, base, recipe, key, out, progress)
    return ref


def _train(examples: pl.DataFrame, base: str, recipe: Recipe, key: str, out: Path,
           progress: Callable[[int, int], None] | None = None) -> FinetunedRef:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                log.info("fine-tune %s: step %d/%d, loss %.4f", key[:12], state.global_step, state.max_steps,
                         float(logs["loss"]))
                if progress is not None:
                    progress(state.global_step, state.max_steps)

    if settings().torch_threads:
        torch.set_num_threads(settings().torch_threads)
    path = causal_lm_path(base)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    template = resolve_template(tokenizer, recipe.template)
    dataset = tokenize_selection(tokenizer, examples, recipe.max_length)
    bf16, device = _precision(recipe)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    work = out.with_name(out.name + ".partial")
    packing = recipe.batching == "packing"
    args = SFTConfig(
        output_dir=str(work),
        num_train_epochs=recipe.epochs,
        max_steps=recipe.max_steps or -1,
        learning_rate=recipe.lr,
        lr_scheduler_type="cosine",
        warmup_steps=recipe.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=recipe.weight_decay,
        per_device_train_batch_size=recipe.batch_size,
        gradient_accumulation_steps=recipe.grad_accum,
        max_length=recipe.max_length,
        packing=packing,
        train_sampling_strategy="random" if packing else "group_by_length",
        seed=recipe.seed,
        data_seed=recipe.seed,
        bf16=bf16,
        use_cpu=device == "cpu",
        save_strategy="steps",
        save_steps=recipe.save_steps,
        save_total_limit=2,
        logging_steps=recipe.logging_steps,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataset_num_proc=None,
    )
    peft_config = None if recipe.full else LoraConfig(
        r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
        target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Progress()])
    resume = last_checkpoint(work) if work.exists() else None
    resumed_from = int(resume.name.split("-")[-1]) if resume else None
    if resume:
        log.info("resuming fine-tuning %s from %s", key, resume.name)
    started = time.monotonic()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(tmp)  # the adapter alone for LoRA, the full weights otherwise
    tokenizer.save_pretrained(tmp)
    ref = FinetunedRef(
        key=key, base=base, base_id=model_identity(base), recipe=recipe, full=recipe.full, template=template,
        examples=dataset.num_rows, selection_fingerprint=fingerprint(examples["uid"]),
        steps=trainer.state.global_step, resumed_from_step=resumed_from,
        runtime_s=round(time.monotonic() - started, 2), device=device, **_loss_summary(trainer.state.log_history))
    (tmp / FINISHED).write_text(ref.model_dump_json(indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    shutil.rmtree(work, ignore_errors=True)
    log.info("fine-tuned %s on %d examples: %d steps, loss %s -> %s", base, ref.examples, ref.steps,
             ref.loss_first, ref.loss_last)
    return ref


def load_finetuned(ref: FinetunedRef, dtype: str = "float32"):
    """(model, tokenizer) of a fine-tuned model, in eval mode on the best device; the tokenizer
    carries the chat template used in training.

    The folder loads through :func:`load_causal_lm` like any model folder (transformers attaches a
    LoRA adapter to the base named in its ``adapter_config.json``), so the evaluation's losses and
    the local chat backend (``LocalChat(ref.path)``) share one loaded copy per process."""
    folder = finetuned_dir(ref.key)
    if not (folder / FINISHED).exists():
        raise FileNotFoundError(f"fine-tuned model {ref.key} is not in the model cache ({folder.name}); "
                                "fine-tune again to rebuild it")
    rebase_adapter(folder, ref.base)
    return load_causal_lm(str(folder), dtype)


def rebase_adapter(folder: Path, base: str) -> None:
    """Point a LoRA adapter at where its base model is now. peft records the base's resolved folder
    at training time; the model cache (or a converted embedded model) may since have moved, while
    the cache key names the base by its identity, not its folder."""
    config = folder / "adapter_config.json"
    if not config.exists():
        return
    data = json.loads(config.read_text())
    where = causal_lm_path(base)
    if data.get("base_model_name_or_path") != where:
        data["base_model_name_or_path"] = where
        tmp = config.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(config)


# -- Prefect ---------------------------------------------------------------------------------------


def _finetune_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """The fine-tune key while the finished folder exists; None (no cache) otherwise, so a cached
    reference never outlives the weights it names."""
    recipe = parameters.get("recipe") or Recipe()
    key = finetune_key(parameters["examples"], parameters.get("base", "smollm2-135m-instruct"), recipe)
    return f"finetune-{key}" if (finetuned_dir(key) / FINISHED).exists() else None


# log_prints off: dill prints bytecode disassemblies while `datasets` fingerprints TRL's functions
@task(name="fine-tune-seed-model", cache_key_fn=_finetune_cache_key, persist_result=True,
      result_serializer="json", retries=1, retry_delay_seconds=[5], log_prints=False)
def finetune_task(examples: pl.DataFrame, base: str = "smollm2-135m-instruct",
                  recipe: Recipe | None = None) -> FinetunedRef:
    """Prefect task: :func:`finetune`, with a progress artifact. A retry (or a re-run after a kill)
    resumes from the last checkpoint."""
    return finetune(examples, base, recipe,
                    progress=progress_artifact(f"fine-tuning {base} on {examples.height} examples", unit="steps"))
