"""ONNX Runtime vs PyTorch eager on the same machine and inputs: reward scoring latency and generation tokens/s.

Models have the default policy's shape (GPT-2, 192 wide, 4 layers, 3 heads, 2048 vocabulary, 256 positions) with
random weights: speed does not depend on the weights. Both are exported with `alignpipe.lm.onnx_runtime` (the code
the export stage runs), fp32 and int8 (dynamic quantization). Reward scoring: batches of 1 and 8 sequences of
`--reward-len` tokens. Generation: prompts of `--prompt-len` tokens, exactly `--new-tokens` greedy tokens (no
EOS), PyTorch `generate()` (with its KV cache) against the ONNX KV-cache loop. Median of `--repeats` timed calls,
the contenders taking turns. Usage: `python benchmarks/onnx_speed.py --out benchmarks/results/onnx_speed.md`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from machine import cpu_name  # benchmarks/machine.py (scripts run with benchmarks/ on sys.path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-embd", type=int, default=192)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=3)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--n-positions", type=int, default=256)
    p.add_argument("--reward-len", type=int, default=128, help="tokens per scored sequence")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", default="0,1", help="comma-separated thread counts, the same for both runtimes, "
                   "one set of tables each (0: torch's default, one per core)")
    p.add_argument("--out", default=None, help="also write the output (markdown) to this file")
    args = p.parse_args(argv)

    import onnxruntime as ort
    import torch
    import transformers
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    from alignpipe.lm import onnx_runtime as ox

    thread_counts = list(dict.fromkeys(int(t) or torch.get_num_threads() for t in args.threads.split(",")))
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    torch.manual_seed(0)
    cfg = dict(n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head, vocab_size=args.vocab,
               n_positions=args.n_positions, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    policy = GPT2LMHeadModel(GPT2Config(**cfg)).eval()
    reward = GPT2ForSequenceClassification(GPT2Config(**cfg, num_labels=1)).eval()
    work = Path(tempfile.mkdtemp(prefix="onnx_speed_"))
    ox.export_policy(policy, work / "policy.onnx")
    ox.export_reward(reward, work / "reward.onnx")
    for name in ("policy", "reward"):
        ox.quantize_int8(work / f"{name}.onnx", work / f"{name}.int8.onnx")
    export_s = time.perf_counter() - started

    n_params = sum(p.numel() for p in policy.parameters())
    say("# ONNX Runtime vs PyTorch eager (benchmarks/onnx_speed.py)")
    say()
    say(f"- machine: {cpu_name()}, {os.cpu_count()} logical CPUs, shared with other jobs "
        f"(1-min load average {load_start:.1f} at start)")
    say(f"- torch {torch.__version__}, transformers {transformers.__version__}, onnxruntime {ort.__version__} "
        f"({ox.CPU}, ORT_ENABLE_ALL); both runtimes get the same thread count")
    say(f"- model: GPT-2 {args.n_embd}d/{args.n_layer}L/{args.n_head}h, vocab {args.vocab}, "
        f"{args.n_positions} positions, {n_params / 1e6:.1f}M params, random weights; fp32 unless noted; "
        f"int8 = quantize_dynamic QInt8 weights")
    say(f"- median of {args.repeats} timed calls, contenders interleaved; export + quantization took "
        f"{export_s:.0f} s")
    say()
    for threads in thread_counts:
        torch.set_num_threads(threads)
        sessions = {prec: (ox.OrtPolicy(ox.open_session(work / f"policy{sfx}.onnx", [ox.CPU], threads)),
                           ox.OrtReward(ox.open_session(work / f"reward{sfx}.onnx", [ox.CPU], threads)))
                    for prec, sfx in (("fp32", ""), ("int8", ".int8"))}
        measure(args, threads, policy, reward, sessions, say)
    load_end = os.getloadavg()[0]
    say(f"Total {time.perf_counter() - started:.0f} s; 1-min load average {load_end:.1f} at the end.")
    if max(load_start, load_end) > (os.cpu_count() or 1) and len(thread_counts) > 1:
        say()
        say("Note: the machine was oversubscribed (load average above the number of CPUs). Multi-threaded PyTorch "
            "eager then slows down far more than onnxruntime (its OpenMP threads wait for preempted peers), which "
            "inflates the multi-thread speedups; the 1-thread tables are the fairer comparison.")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


def measure(args, threads: int, policy, reward, sessions, say) -> None:
    """The reward and generation tables at one thread count."""
    import numpy as np

    from alignpipe.lm import onnx_runtime as ox

    rng = np.random.default_rng(0)
    say(f"## Reward scoring, {args.reward_len} tokens per sequence, {threads} thread(s)")
    say()
    say("| batch | PyTorch eager ms | ORT fp32 ms | ORT int8 ms | speedup fp32 | speedup int8 | max abs diff fp32 |")
    say("|---|---|---|---|---|---|---|")
    for batch in (1, 8):
        ids = rng.integers(2, args.vocab, (batch, args.reward_len))
        mask = np.ones_like(ids)
        diff = np.abs(sessions["fp32"][1].score(ids, mask) - ox.torch_rewards(reward, ids, mask)).max()
        t = ox.median_seconds(args.repeats, {
            "torch": lambda: ox.torch_rewards(reward, ids, mask),
            "fp32": lambda: sessions["fp32"][1].score(ids, mask),
            "int8": lambda: sessions["int8"][1].score(ids, mask),
        })
        say(f"| {batch} | {1e3 * t['torch']:.2f} | {1e3 * t['fp32']:.2f} | {1e3 * t['int8']:.2f} | "
            f"{t['torch'] / t['fp32']:.2f}x | {t['torch'] / t['int8']:.2f}x | {diff:.1e} |")
    say()

    say(f"## Greedy generation, {args.prompt_len}-token prompts, {args.new_tokens} new tokens (KV cache), "
        f"{threads} thread(s)")
    say()
    say("| batch | PyTorch generate() tok/s | ORT fp32 loop tok/s | ORT int8 loop tok/s | speedup fp32 | "
        "speedup int8 | fp32 tokens equal | int8 tokens equal |")
    say("|---|---|---|---|---|---|---|---|")
    kw = dict(eos_token_id=None, pad_token_id=1)
    for batch in (1, 8):
        ids = rng.integers(2, args.vocab, (batch, args.prompt_len))
        mask = np.ones_like(ids)
        want = ox.torch_generate(policy, ids, mask, args.new_tokens, **kw)
        equal = {prec: float(np.mean((s[0].generate(ids, mask, args.new_tokens, **kw) == want).all(axis=1)))
                 for prec, s in sessions.items()}
        t = ox.median_seconds(args.repeats, {
            "torch": lambda: ox.torch_generate(policy, ids, mask, args.new_tokens, **kw),
            "fp32": lambda: sessions["fp32"][0].generate(ids, mask, args.new_tokens, **kw),
            "int8": lambda: sessions["int8"][0].generate(ids, mask, args.new_tokens, **kw),
        })
        tps = {k: batch * args.new_tokens / v for k, v in t.items()}
        say(f"| {batch} | {tps['torch']:.0f} | {tps['fp32']:.0f} | {tps['int8']:.0f} | "
            f"{tps['fp32'] / tps['torch']:.2f}x | {tps['int8'] / tps['torch']:.2f}x | "
            f"{equal['fp32']:.0%} of rows | {equal['int8']:.0%} of rows |")
    say()


if __name__ == "__main__":
    raise SystemExit(main())
