"""reward: a reward model's score of (prompt, response) as a signal (reads ``messages`` and
``output``; writes a float), and the small reward model the project trains when no checkpoint is given.

**Score.** A sequence-classification model with one output reads the example's prompt (every turn
before the last answer: for an Alpaca record the instruction, a blank line and the input) and its
answer; its logit is the reward ``r(x, y)``. The pair is rendered the way the model was trained:

- a tokenizer with a chat template: the template's rendering of ``prompt + [assistant: answer]``
  (how TRL's ``RewardTrainer`` renders conversational pairs, and so how the default model learned);
- otherwise the text pair ``tokenizer(question, answer)``, the form OpenAssistant's DeBERTa reward
  models are read in (the reward model of MoDS and of InstructMining).

A rendering longer than ``max_length`` tokens is cut (:func:`render`): the answer's start and the
template's closing tokens (where a decoder's classification head reads) are kept, the prompt loses its
start first. Any local Hugging Face sequence-classification
checkpoint folder (named by its content, ``folder:<sha256>``) or hub id serves.

**The default reward model** (no checkpoint offline: no reward model ships on PyPI). The project
trains one, once, with TRL's ``RewardTrainer`` on a preference file (``flows/data/reward_pairs.jsonl``,
written for this project, unless another is given): the Bradley-Terry pairwise loss of Ouyang et al.
2022 (InstructGPT), over pairs (x, y_chosen, y_rejected),

    L = - mean log sigmoid( r(x, y_chosen) - r(x, y_rejected) ),

on the small local model (SmolLM2-135M-Instruct) with a fresh one-output head. To stay affordable on
a CPU, only the top ``trainable_layers`` decoder layers, the final norm and the head are trained
(:class:`RewardRecipe`); precision as fine-tuning's (bf16 only where this device runs it fast).
The result is cached like a fine-tuned model: under ``<model cache>/reward/<key>`` with
``key = sha256(the preference file's content, the base model's identity, the recipe's hash)``; its
identity, which names the reward signal, is ``reward:<key>``. A finished folder is reused as it is.

Preference files: JSON or JSONL (optionally gzipped) records in one of three forms: ``{prompt,
chosen, rejected}`` with strings or message lists (TRL's explicit-prompt form, and this project's
file); LLaMA-Factory's ``{conversations, chosen, rejected}``; Anthropic HH-RLHF's ``{chosen,
rejected}`` dialogue strings (the shared prompt is the turns both share).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import polars as pl
from filelock import FileLock
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, computed_field

from sft_select.settings import settings
from sft_select.storage import BatchResult, NotFilled, Signal, make_example
from sft_select.storage.examples import frame
from sft_select.storage.signals import Compute
from sft_select.tasks.backends.models import FOLDER, causal_lm_path, model_identity
from sft_select.tasks.finetune import _common_prefix
from sft_select.tasks.lm_loss import by_length
from sft_select.tasks.signal_task import get_store, planning, signal_task

log = logging.getLogger("sft_select")

VERSION = "1"
REWARD = "reward:"  # "reward:<key>" names a reward model trained here by its cache key
DEFAULT = "default"  # the reward model trained on the shipped preference file
DEFAULT_BASE = "smollm2-135m-instruct"
DEFAULT_PAIRS = Path(__file__).resolve().parents[1] / "flows" / "data" / "reward_pairs.jsonl"
FINISHED = "reward.json"  # written last into a finished folder
_sources: dict[str, tuple[Path, str, "RewardRecipe"]] = {}  # reward:<key> -> what trains it (this process)

Messages = list[dict[str, str]]


class RewardRecipe(BaseModel):
    """How the default reward model is trained. Every field but ``logging_steps`` is in the cache key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: float = Field(2.0, gt=0, description="passes over the preference pairs")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (linear decay, linear warm-up)")
    batch_size: int = Field(8, ge=1, description="pairs per step")
    max_length: int = Field(256, ge=16, description="tokens per rendered (prompt, answer); longer ones are cut")
    trainable_layers: int | None = Field(
        4, ge=0, description="top decoder layers trained with the head and the final norm; empty: every weight")
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    center_rewards: float | None = Field(
        0.01, ge=0, description="coefficient pulling rewards towards mean 0 (Eisenstein et al. 2023), so that the "
                                "0.0 thresholds of MoDS mean 'better or worse than typical'")
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    seed: int = 42
    logging_steps: int = Field(5, ge=1)

    def hash(self) -> str:
        fields = self.model_dump(exclude={"logging_steps"})
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


class RewardModelRef(BaseModel):
    """A reward model trained here, in the model cache."""

    key: str
    base: str
    base_id: str
    pairs_file: str = Field(description="the preference file's name (its content is in the key)")
    pairs_digest: str
    pairs: int = Field(description="pairs trained on (after the length cut)")
    recipe: RewardRecipe
    steps: int
    train_loss: float | None = None
    train_accuracy: float | None = Field(None, description="share of training pairs ranked right, last logged steps")
    runtime_s: float = 0.0
    device: str = "cpu"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def identity(self) -> str:
        return REWARD + self.key

    @computed_field  # type: ignore[prop-decorator]
    @property
    def path(self) -> str:
        return str(reward_dir(self.key))


def reward_dir(key: str) -> Path:
    return settings().model_cache / "reward" / key


# -- preference pairs ----------------------------------------------------------------------------------


class Pair(BaseModel):
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str


def _read_records(path: Path) -> list[dict[str, Any]]:
    raw = gzip.open(path, "rt", encoding="utf-8").read() if path.suffix == ".gz" else path.read_text("utf-8")
    stripped = raw.lstrip()
    if stripped.startswith("["):
        return json.loads(raw)
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _turns(value: Any) -> list[dict[str, str]]:
    """Messages from a string (one user turn), a message list, or ShareGPT ``{from, value}`` turns."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, dict):
        value = [value]
    return [{"role": _ROLES[t.get("role") or t.get("from")], "content": t.get("content", t.get("value", ""))}
            for t in value]


def _answer(value: Any) -> str:
    if isinstance(value, str):
        return value
    turns = _turns(value)
    if turns[-1]["role"] != "assistant":
        raise ValueError("a chosen/rejected message list must end with an assistant turn")
    return turns[-1]["content"]


def _hh_dialogue(text: str) -> list[dict[str, str]]:
    parts = re.split(r"\n\n(Human|Assistant):", "\n\n" + text.strip())
    return [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
            for who, said in zip(parts[1::2], parts[2::2])]


def read_pairs(path: str | Path) -> list[Pair]:
    """The preference pairs of a file (module docstring: the three accepted forms)."""
    pairs = []
    for i, rec in enumerate(_read_records(Path(path))):
        try:
            if "prompt" in rec:
                prompt = _turns(rec["prompt"])
            elif "conversations" in rec:
                prompt = ([{"role": "system", "content": rec["system"]}] if rec.get("system") else []) + _turns(
                    rec["conversations"])
            elif isinstance(rec.get("chosen"), str) and "\n\nAssistant:" in "\n\n" + rec["chosen"]:
                chosen, rejected = _hh_dialogue(rec["chosen"]), _hh_dialogue(rec["rejected"])
                shared = 0
                while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
                    shared += 1
                if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
                    raise ValueError("a dialogue must end with an Assistant turn")
                pairs.append(Pair(prompt=chosen[:shared], chosen=chosen[-1]["content"],
                                  rejected=rejected[-1]["content"]))
                continue
            else:
                raise ValueError("expected prompt/chosen/rejected, conversations/chosen/rejected or HH-RLHF dialogues")
            pairs.append(Pair(prompt=prompt, chosen=_answer(rec["chosen"]), rejected=_answer(rec["rejected"])))
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{Path(path).name}, record {i}: {e}") from None
    if not pairs:
        raise ValueError(f"{Path(path).name}: no preference pairs")
    return pairs


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:16]


# -- rendering and scoring -------------------------------------------------------------------------------


def render(tokenizer: Any, prompt: Messages, answer: str, max_length: int) -> list[int]:
    """Token ids of (prompt, answer) as the reward model reads them (module docstring), at most
    ``max_length``: a text pair is cut longest-first; a chat rendering keeps the template's tokens
    after the answer, the answer's start (at least half the length, where the answer is that long)
    and the end of the prompt, which loses its start."""
    if not tokenizer.chat_template:
        question = "\n\n".join(m["content"] for m in prompt if m["role"] != "system")
        return tokenizer(question, answer, truncation="longest_first", max_length=max_length)["input_ids"]

    def ids(messages: Messages, generation_prompt: bool = False) -> list[int]:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    full = ids(list(prompt) + [{"role": "assistant", "content": answer}])
    if len(full) <= max_length:
        return full
    head = _common_prefix(ids(list(prompt), generation_prompt=True), full)  # the prompt and the answer's header
    empty = ids(list(prompt) + [{"role": "assistant", "content": ""}])
    tail = len(empty) - _common_prefix(ids(list(prompt), generation_prompt=True), empty)  # after the answer
    body = full[head: len(full) - tail]
    keep = min(len(body), max(max_length - tail - head, max_length // 2), max_length - tail)
    room = max_length - tail - keep  # for the end of the prompt
    return (full[head - room: head] if room > 0 else []) + body[:keep] + full[len(full) - tail:]


def reward_scores(model: Any, tokenizer: Any, sequences: Sequence[list[int]], batch_size: int = 16) -> list[float]:
    """The model's one logit for each token sequence: batches of similar length, right-padded with
    the pad token (the head reads the last token that is not padding, as in training)."""
    import torch

    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    scores = [math.nan] * len(sequences)
    pad = tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(sequences[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
            mask[row, : len(sequences[i])] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
        for row, i in enumerate(chunk):
            scores[i] = float(logits[row, 0])
    return scores


def load_reward_model(identity: str):
    """(model, tokenizer) of a reward model identity, in eval mode on the best device; trains the
    default model first when this process knows how and its folder is missing."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = reward_model_path(identity)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).to(device).eval()
    if model.config.num_labels != 1:
        raise ValueError(f"{identity}: a reward model has one output (num_labels=1), this one has "
                         f"{model.config.num_labels}")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def reward_model_path(identity: str) -> str:
    """The folder (or hub id) of a reward model identity."""
    if identity.startswith(REWARD):
        key = identity.removeprefix(REWARD)
        if not (reward_dir(key) / FINISHED).exists():
            if key not in _sources:
                raise FileNotFoundError(f"reward model {identity} is not in the model cache and this process does "
                                        "not know its preference file: resolve it with resolve_reward_model first")
            train_reward_task(*_sources[key])
        return str(reward_dir(key))
    if identity.startswith(FOLDER):
        from sft_select.tasks.backends.models import encoder_path

        return encoder_path(identity)  # the folder this process identified
    return identity


def preference_accuracy(identity: str, pairs: Sequence[Pair], max_length: int = 512,
                        batch_size: int = 16) -> dict[str, float]:
    """How often the reward model scores the chosen answer above the rejected one:
    ``accuracy`` (strictly above), ``ties``, ``pairs``, ``mean_margin``, ``seconds``."""
    model, tokenizer = load_reward_model(identity)
    began = time.perf_counter()
    seqs = [render(tokenizer, p.prompt, a, max_length) for p in pairs for a in (p.chosen, p.rejected)]
    scores = reward_scores(model, tokenizer, seqs, batch_size)
    margins = [c - r for c, r in zip(scores[0::2], scores[1::2])]
    return {"pairs": float(len(pairs)), "accuracy": sum(m > 0 for m in margins) / len(margins),
            "ties": float(sum(m == 0 for m in margins)), "mean_margin": sum(margins) / len(margins),
            "seconds": round(time.perf_counter() - began, 2)}


# -- the signal ----------------------------------------------------------------------------------------


def resolve_reward_model(spec: str | None = DEFAULT, pairs: str | Path | None = None, base: str = DEFAULT_BASE,
                         recipe: RewardRecipe | None = None) -> str:
    """The identity of the reward model ``spec`` names: ``default`` (or empty) the model trained here
    on ``pairs`` (the shipped file when empty) from ``base`` with ``recipe``, as ``reward:<key>``
    (nothing is trained until a score is missing); a local checkpoint folder as ``folder:<sha256>``;
    anything else (a hub id, an identity) as it is."""
    if spec not in (None, "", DEFAULT):
        return model_identity(spec)
    path = Path(pairs).expanduser() if pairs else DEFAULT_PAIRS
    recipe = recipe or RewardRecipe()
    key = reward_key(path, base, recipe)
    _sources[key] = (path, base, recipe)
    return REWARD + key


def reward_key(pairs: Path, base: str, recipe: RewardRecipe) -> str:
    """sha256 of (the preference file's content, the base model's identity, the recipe's hash)."""
    parts = [file_digest(pairs), model_identity(base), recipe.hash()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def reward_signal(model: str, *, max_length: int = 512) -> Signal:
    """The ``reward`` signal of a reward model identity (:func:`resolve_reward_model`)."""
    return Signal("reward", {"model": model_identity(model), "max_length": max_length}, version=VERSION,
                  kind="float")


def build_reward(signal: Signal) -> Compute:
    """The batch function of a ``reward`` signal (the model is loaded, or trained, on the first batch)."""
    model, tokenizer = load_reward_model(str(signal.params["model"]))
    max_length = int(signal.params["max_length"])

    def compute(batch: pl.DataFrame) -> BatchResult:
        seqs = [render(tokenizer, m[:-1], out, max_length)
                for m, out in zip(batch["messages"].to_list(), batch["output"].to_list())]
        return BatchResult.of(reward_scores(model, tokenizer, seqs), calls=float(len(seqs)))

    return compute


reward = signal_task("reward", build_reward, batch_size=32, order_by=by_length)
"""Prefect task ``(signal, dataset[, batch_size][, uids]) -> SignalRef``: fill a :func:`reward_signal`."""


def score_answers(signal: Signal, prompts: Sequence[Messages], answers: Sequence[str],
                  batch_size: int = 32) -> list[float | None]:
    """Plain function: the reward of each (prompt, answer), where the answers are not examples of a
    dataset (a model's generations): each pair is keyed as the canonical example it forms, stored in
    the same ``reward`` signal batch by batch, and never scored twice. ``None`` where scoring failed."""
    rows = frame([make_example(list(p) + [{"role": "assistant", "content": a}]) for p, a in zip(prompts, answers)])
    compute: Compute | None = None

    def lazy(batch: pl.DataFrame) -> BatchResult:  # the model is loaded only when a score is missing
        nonlocal compute
        compute = compute or build_reward(signal)
        return compute(batch)

    store = get_store()
    store.signals.fill(signal, rows.unique("uid", maintain_order=True), lazy, batch_size=batch_size,
                       order_by=by_length)
    values = dict(store.signals.values(signal, rows["uid"], alias="reward").iter_rows())
    return [values.get(u) for u in rows["uid"]]


@task(name="score-answers", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=[5])
def score_answers_task(signal: Signal, prompts: list[Messages], answers: list[str],
                       batch_size: int = 32) -> list[float | None]:
    """Prefect task: :func:`score_answers`."""
    return score_answers(signal, prompts, answers, batch_size)


# -- training the default model ---------------------------------------------------------------------------


def _freeze(model: Any, trainable_layers: int | None) -> int:
    """Freeze the embeddings and every decoder layer below the top ``trainable_layers``; returns how
    many parameters stay trainable."""
    if trainable_layers is None:
        return sum(p.numel() for p in model.parameters())
    index = re.compile(r"(?:^|\.)layers\.(\d+)\.")
    depth = 1 + max(int(m.group(1)) for n, _ in model.named_parameters() if (m := index.search(n)))
    trainable = 0
    for name, param in model.named_parameters():
        layer = index.search(name)
        keep = (int(layer.group(1)) >= depth - trainable_layers) if layer else "embed" not in name
        param.requires_grad = keep
        trainable += param.numel() if keep else 0
    return trainable


def train_reward_model(pairs_path: str | Path, base: str = DEFAULT_BASE, recipe: RewardRecipe | None = None,
                       progress: Callable[[int, int], None] | None = None) -> RewardModelRef:
    """Plain function: train (or find in the cache) the reward model of (preference file, base, recipe)."""
    recipe, path = recipe or RewardRecipe(), Path(pairs_path)
    key = reward_key(path, base, recipe)
    _sources[key] = (path, base, recipe)
    out = reward_dir(key)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / FINISHED).exists():
            return RewardModelRef.model_validate_json((out / FINISHED).read_text())
        if planning() is not None:
            raise NotFilled(f"training a reward model on {path.name}: a dry run stops before training")
        return _train(path, base, recipe, key, out, progress)


def _train(path: Path, base: str, recipe: RewardRecipe, key: str, out: Path,
           progress: Callable[[int, int], None] | None) -> RewardModelRef:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from sft_select.tasks.finetune import Recipe, _loss_summary, _precision

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                log.info("reward model %s: step %d/%d, loss %.4f, accuracy %.3f", key[:12], state.global_step,
                         state.max_steps, float(logs["loss"]), float(logs.get("accuracy", math.nan)))
                if progress is not None:
                    progress(state.global_step, state.max_steps)

    if settings().torch_threads:
        torch.set_num_threads(settings().torch_threads)
    folder = causal_lm_path(base)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    pairs = read_pairs(path)
    rows: dict[str, list[list[int]]] = {"chosen_ids": [], "rejected_ids": []}
    for p in pairs:
        rows["chosen_ids"].append(render(tokenizer, p.prompt, p.chosen, recipe.max_length))
        rows["rejected_ids"].append(render(tokenizer, p.prompt, p.rejected, recipe.max_length))
    torch.manual_seed(recipe.seed)  # the fresh head's initial weights
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    trainable = _freeze(model, recipe.trainable_layers)
    bf16, device = _precision(Recipe(precision=recipe.precision))
    work = out.with_name(out.name + ".partial")
    args = RewardConfig(
        output_dir=str(work), num_train_epochs=recipe.epochs, learning_rate=recipe.lr,
        per_device_train_batch_size=recipe.batch_size, warmup_steps=recipe.warmup_ratio, seed=recipe.seed,
        data_seed=recipe.seed, bf16=bf16, use_cpu=device == "cpu", gradient_checkpointing=False,
        max_length=None, center_rewards_coefficient=recipe.center_rewards, save_strategy="no",
        logging_steps=recipe.logging_steps, report_to="none", disable_tqdm=True, dataloader_num_workers=0)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_dict(rows),
                            processing_class=tokenizer, callbacks=[Progress()])
    log.info("training reward model %s: %s on %d pairs of %s, %d trainable parameters", key[:12], base, len(pairs),
             path.name, trainable)
    started = time.monotonic()
    trainer.train()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    history = trainer.state.log_history
    accuracy = [float(h["accuracy"]) for h in history if "accuracy" in h]
    ref = RewardModelRef(key=key, base=base, base_id=model_identity(base), pairs_file=path.name,
                         pairs_digest=file_digest(path), pairs=len(pairs), recipe=recipe,
                         steps=trainer.state.global_step, train_loss=_loss_summary(history)["train_loss"],
                         train_accuracy=accuracy[-1] if accuracy else None,
                         runtime_s=round(time.monotonic() - started, 2), device=device)
    (tmp / FINISHED).write_text(ref.model_dump_json(indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    shutil.rmtree(work, ignore_errors=True)
    log.info("trained reward model %s in %.0f s: %d steps, loss %s", key[:12], ref.runtime_s, ref.steps, ref.train_loss)
    return ref



# log_prints off: dill prints bytecode disassemblies while `datasets` fingerprints TRL's functions
@task(name="train-reward-model", cache_policy=NO_CACHE, log_prints=False)
def train_reward_task(pairs_path: Path, base: str = DEFAULT_BASE, recipe: RewardRecipe | None = None) -> RewardModelRef:
    """Prefect task: :func:`train_reward_model` (a finished model in the cache is returned as it is)."""
    return train_reward_model(pairs_path, base, recipe)


__all__ = ["DEFAULT", "DEFAULT_PAIRS", "Pair", "RewardModelRef", "RewardRecipe", "build_reward", "load_reward_model",
           "preference_accuracy", "read_pairs", "render", "resolve_reward_model", "reward", "reward_scores",
           "reward_signal", "score_answers", "score_answers_task", "train_reward_model", "train_reward_task"]
