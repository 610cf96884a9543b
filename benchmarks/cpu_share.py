"""How close the loss engine and the local judge come to this machine's own matrix-multiply rate.

Most time of the model-heavy methods goes to two places: the loss engine (answer losses, for IFD,
Nuggets, Active-IT, perplexity) and the local judge (greedy generation). Both are matrix multiplies
of the decoder's weights in the end, so their ceiling on a CPU is the rate at which this CPU
multiplies matrices of the model's layer shapes. Measured side by side in one run:

1. **peak**: GFLOP/s of the decoder's own matmul mix (q, k, v, o, gate, up, down and the output
   layer, each at its share of the FLOPs), for blocks of 512 rows, in float32, in bfloat16 and
   through int8 dynamically quantised linear layers (``precision="int8"``: the layers as
   ``load_scoring_lm`` quantises them, activations quantised on the fly);
2. **loss engine**: ``example_losses`` (conditioned and unconditioned) over alpaca_9k examples; its
   FLOPs are counted from the model's config: ``2 * P_layers`` per token, ``2 * d * V`` per answer
   token (the engine's output layer sees answer positions only) and attention ``4 * d * L^2 / 2``
   per layer and sequence;
3. **local judge**: ``LocalChat.chat`` with AlpaGasus's text prompt (prefill, then greedy decoding of
   up to ``--new-tokens``), FLOPs counted the same way (the output layer on the last prompt position
   and every generated one); in batches of 8 conversations (the judge before issue 11) and in its
   default batches (by length, up to 32 conversations and a token budget);
4. the per-example two-pass loop of ``benchmarks/loss_engine.py`` for the engine's ratio.

Each share is achieved GFLOP/s over the peak of the precision it ran at (int8 FLOPs are counted
as the same multiply-adds). Target: >= 50% each. bf16 runs only where this CPU runs it at least
as fast as float32 (the measured probe of ``tasks/backends/precision.py``), unless ``--bf16``
forces it; int8 runs unless ``--no-int8``.

    python benchmarks/cpu_share.py [--examples 32] [--judge-examples 64] [--new-tokens 32] [--threads N] [--no-int8]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from sft_select.storage import read_examples
from sft_select.tasks.backends import loss_engine as lm
from sft_select.tasks.backends.chat import LocalChat
from sft_select.tasks.backends.models import load_causal_lm, load_scoring_lm
from sft_select.tasks.backends.precision import bf16_is_fast
from sft_select.tasks.prompts import ALPAGASUS

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "train" / "alpaca_9k.json"
ROWS = 512


def shapes(config) -> tuple[list[tuple[int, int]], int]:
    """(in, out) of every linear layer of one decoder layer, and the output layer's vocabulary."""
    d, i = config.hidden_size, config.intermediate_size
    kv = d * config.num_key_value_heads // config.num_attention_heads
    return [(d, d), (d, kv), (d, kv), (d, d), (d, i), (d, i), (i, d)], config.vocab_size


def layer_params(config) -> int:
    return config.num_hidden_layers * sum(a * b for a, b in shapes(config)[0])


def peak(config, precision: str, reps: int = 3) -> float:
    """GFLOP/s of one pass of ROWS rows through the decoder's matmuls (every layer and the output
    layer), best of ``reps``: plain matmuls in float32 or bfloat16, int8 dynamically quantised
    ``Linear`` layers (as ``load_scoring_lm`` makes them) for "int8"."""
    layers, vocab = shapes(config)
    sizes = layers * config.num_hidden_layers + [(config.hidden_size, vocab)]
    flops = sum(2 * ROWS * a * b for a, b in sizes)
    if precision == "int8":
        import warnings

        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            linears = quantize_dynamic(torch.nn.ModuleList(torch.nn.Linear(a, b, bias=False) for a, b in sizes),
                                       {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
        mats = [(torch.randn(ROWS, a), layer) for (a, _), layer in zip(sizes, linears)]
    else:
        dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
        mats = [(torch.randn(ROWS, a, dtype=dtype), torch.randn(a, b, dtype=dtype)) for a, b in sizes]
        mats = [(x, lambda x, w=w: x @ w) for x, w in mats]
    with torch.inference_mode():
        for x, f in mats:  # warm-up
            f(x)
        best = float("inf")
        for _ in range(reps):
            began = time.perf_counter()
            for x, f in mats:
                f(x)
            best = min(best, time.perf_counter() - began)
    return flops / best / 1e9


def forward_flops(config, tokens: int, logits: int, lengths: list[int]) -> float:
    """FLOPs of forward passes over ``tokens`` positions, ``logits`` of them through the output
    layer, sequences of ``lengths`` (causal attention: QK^T and AV over half the square)."""
    attention = 4 * config.hidden_size * config.num_hidden_layers * sum(n * n / 2 for n in lengths)
    return 2 * layer_params(config) * tokens + 2 * config.hidden_size * config.vocab_size * logits + attention


def engine_run(model, tokenizer, rows, bf16: bool = False) -> tuple[float, float]:
    """(seconds, FLOPs) of the engine's conditioned and unconditioned answer losses."""
    began = time.perf_counter()
    results = [lm.example_losses(model, tokenizer, rows, conditioned=c, template="chat", max_length=2048,
                                 token_budget=8192, bf16=bf16) for c in (True, False)]
    seconds = time.perf_counter() - began
    flat = [r for rs in results for r in rs]
    lengths = [r.context_tokens + r.answer_tokens for r in flat]
    return seconds, forward_flops(model.config, sum(lengths), sum(r.answer_tokens for r in flat), lengths)


def judge_run(judge: LocalChat, rows, new_tokens: int) -> tuple[float, float]:
    """(seconds, FLOPs) of the local judge rating ``rows`` (prefill + greedy decoding)."""
    prompt = ALPAGASUS["accuracy", "text"]
    conversations = [prompt.render(r) for r in rows]
    began = time.perf_counter()
    results = judge.chat(conversations, max_tokens=new_tokens)
    seconds = time.perf_counter() - began
    config = load_causal_lm(judge.model_name)[0].config
    prefill = [r.prompt_tokens for r in results]
    generated = [r.completion_tokens for r in results]
    flops = forward_flops(config, sum(prefill), len(prefill), prefill)
    for p, g in zip(prefill, generated):  # each new token: one position, the output layer, attention over the cache
        flops += sum(forward_flops(config, 1, 1, []) + 4 * config.hidden_size * config.num_hidden_layers * (p + k)
                     for k in range(g))
    return seconds, flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--judge-examples", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--bf16", action="store_true", help="measure bf16 even where the probe finds it slower")
    ap.add_argument("--no-int8", action="store_true", help="leave int8 out")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not DATA.exists():
        raise SystemExit(f"needs the shared data ({DATA.name} under ../shared/data/train)")
    rows = read_examples(DATA, on_error="skip").examples.to_dicts()
    config = load_causal_lm("smollm2-135m-instruct")[0].config
    precisions = (["float32"] + (["bfloat16"] if args.bf16 or bf16_is_fast("cpu") else [])
                  + ([] if args.no_int8 else ["int8"]))

    print(f"SmolLM2-135M-Instruct on {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} torch "
          f"threads; {layer_params(config) / 1e6:.0f}M decoder parameters, vocabulary {config.vocab_size}")
    print(f"{'what':<44}{'seconds':>9}{'GFLOP/s':>9}{'share':>8}")
    for name in precisions:
        bf16 = name == "bfloat16"
        model, tokenizer = load_scoring_lm("smollm2-135m-instruct", name)
        top = peak(config, name)
        print(f"{'matmul peak, model layer mix (' + name + ')':<44}{'':>9}{top:>9.1f}{'100%':>8}")
        engine_run(model, tokenizer, rows[:2], bf16)  # warm-up
        seconds, flops = engine_run(model, tokenizer, rows[: args.examples], bf16)
        print(f"{'loss engine, ' + str(args.examples) + ' examples x 2 (' + name + ')':<44}{seconds:>9.1f}"
              f"{flops / seconds / 1e9:>9.1f}{flops / seconds / 1e9 / top:>8.0%}")
        judged = rows[args.examples: args.examples + args.judge_examples]
        for label, judge in (("batches of 8", LocalChat("smollm2-135m-instruct", batch_size=8, precision=name)),
                             ("default batches", LocalChat("smollm2-135m-instruct", precision=name))):
            judge_run(judge, rows[:2], 4)  # warm-up
            seconds, flops = judge_run(judge, judged, args.new_tokens)
            print(f"{'local judge, ' + str(len(judged)) + ' ratings, ' + label + ' (' + name + ')':<44}"
                  f"{seconds:>9.1f}{flops / seconds / 1e9:>9.1f}{flops / seconds / 1e9 / top:>8.0%}")
    if "bfloat16" not in precisions:
        print("bfloat16 not measured: the probe finds it slower than float32 on this CPU (--bf16 measures it anyway)")
    print("target: the loss engine and the local judge each at >= 50% of the peak of the precision they run at")


if __name__ == "__main__":
    main()
