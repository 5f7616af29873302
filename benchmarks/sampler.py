"""Sampling speed: generate() with its dynamic KV cache vs a static (preallocated) cache vs the ONNX KV-cache loop.

The label stage's workload on a trained policy: `--prompts` held-out prompts x `--k` samples each, rows in
batches of `--batch`, at most `--cap` new tokens, one logical line per completion (temperature 0.7, top-p 0.9),
and the evaluate stage's (`--eval-prompts` prompts, one sample each, cap 48) in batches of 64 (its default) and
256. Contenders:

- `generate dynamic`: `alignpipe.lm.policy.sample` with `Sampling(cache="dynamic")` (transformers' DynamicCache,
  which concatenates every step's keys and values onto the cache);
- `generate static`: the same call with `cache="static"` (one preallocated cache per batch);
- `onnx loop`: the exported KV-cache decoder (`alignpipe.lm.ort_sampling.OrtCompleter`, the serving sampler), fp32,
  whose draws come from numpy's generator (same distribution, other draws); its export time is reported apart.

Each contender runs once per workload, in turn, with the same threads. "same samples" counts rows whose
completion ids equal the dynamic run's (sampling with the same seed); greedy rows are compared the same way on the
first `--greedy` prompts. Usage:
`python benchmarks/sampler.py --policy artifacts/pretrain --data data --out benchmarks/results/sampler.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from machine import cpu_name  # benchmarks/machine.py (scripts run with benchmarks/ on sys.path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", required=True, help="a policy directory (e.g. artifacts/pretrain)")
    p.add_argument("--data", required=True, help="the data stage's output (its held-out prompts.jsonl)")
    p.add_argument("--prompts", type=int, default=128, help="label workload: prompts")
    p.add_argument("--k", type=int, default=4, help="label workload: samples per prompt")
    p.add_argument("--batch", type=int, default=256, help="label workload: rows per batch")
    p.add_argument("--cap", type=int, default=32, help="label workload: max new tokens")
    p.add_argument("--eval-prompts", type=int, default=256, help="evaluate workload: prompts (batch 64, cap 48)")
    p.add_argument("--greedy", type=int, default=64, help="greedy identity check: prompts")
    p.add_argument("--threads", type=int, default=0, help="torch and onnxruntime threads (0: one per core)")
    p.add_argument("--out", default=None, help="also write the output (markdown) to this file")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from alignpipe.lm import onnx_runtime as ox
    from alignpipe.lm.ort_sampling import Decoding, OrtCompleter
    from alignpipe.lm.policy import Sampling, finish_completion, load_policy, sample
    from alignpipe.tasks import get_task

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    model, tok, meta = load_policy(args.policy, device="cpu")
    rows = [json.loads(line)["prompt"] for line in Path(args.data, "prompts.jsonl").read_text().splitlines() if line]
    work = Path(tempfile.mkdtemp(prefix="sampler_"))
    t0 = time.perf_counter()
    ox.export_policy(model, work / "policy.onnx")
    export_s = time.perf_counter() - t0
    unit = get_task("pep8").completion_unit()
    completer = OrtCompleter(ox.OrtPolicy(ox.open_session(work / "policy.onnx", [ox.CPU], threads)), tok, meta, 192,
                             get_task("pep8"))

    def onnx(prompts: list[str], sampling: Sampling, greedy: bool = False) -> list[list[int]]:
        rng = np.random.default_rng(0)
        decoding = Decoding(max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
                            temperature=sampling.temperature, top_p=sampling.top_p)
        out = []
        for start in range(0, len(prompts), sampling.batch_size):
            for new in completer.generate(prompts[start:start + sampling.batch_size], decoding, rng):
                cut, _, capped = finish_completion(tok, meta, new, unit)
                out.append((cut, capped))
        return out

    def torch_ids(prompts, sampling, greedy=False):
        drawn = sample(model, tok, meta, prompts, sampling, seed=0, greedy=greedy, unit=unit)
        return [(s.completion_ids, s.capped) for s in drawn]

    say("# Sampling: generate() dynamic vs static KV cache vs the ONNX loop (benchmarks/sampler.py)")
    say()
    say(f"- machine: {cpu_name()}, {os.cpu_count()} logical CPUs, {threads} threads; 1-min load average "
        f"{load_start:.2f} at start")
    n_params = sum(x.numel() for x in model.parameters())
    say(f"- policy: `{args.policy}` ({type(model).__name__}, {n_params / 1e6:.2f}M params); prompts: the first "
        f"held-out prompts of `{args.data}/prompts.jsonl`; ONNX export took {export_s:.1f} s")
    say()
    workloads = [
        (f"label: {args.prompts} prompts x {args.k}, batch {args.batch}, cap {args.cap}",
         [r for r in rows[:args.prompts] for _ in range(args.k)],
         dict(max_new_tokens=args.cap, batch_size=args.batch), False),
        *[(f"evaluate: {args.eval_prompts} prompts x 1, batch {b}, cap 48", rows[:args.eval_prompts],
           dict(max_new_tokens=48, batch_size=b), False) for b in (64, 256)],
        (f"greedy: {args.greedy} prompts, batch 64, cap 48", rows[:args.greedy],
         dict(max_new_tokens=48, batch_size=64), True),
    ]
    say("| workload | contender | seconds | rows/s | speedup vs dynamic | same samples as dynamic | capped frac | "
        "mean new tokens |")
    say("|---|---|---|---|---|---|---|---|")
    for name, prompts, kw, greedy in workloads:
        results = {}
        for contender in ("generate dynamic", "generate static", "onnx loop"):
            sampling = Sampling(**kw, cache="dynamic" if contender == "generate dynamic" else "static")
            t0 = time.perf_counter()
            ids = onnx(prompts, sampling, greedy) if contender == "onnx loop" else torch_ids(prompts, sampling, greedy)
            results[contender] = (time.perf_counter() - t0, ids)
        base_s, base_ids = results["generate dynamic"]
        for contender, (secs, ids) in results.items():
            same = sum(a == b for a, b in zip(ids, base_ids))
            capped = np.mean([c for _, c in ids])
            say(f"| {name} | {contender} | {secs:.1f} | {len(prompts) / secs:.0f} | {base_s / secs:.2f}x | "
                f"{same}/{len(ids)} | {capped:.3f} | {np.mean([len(x) for x, _ in ids]):.1f} |")
    say()
    say(f"Total {time.perf_counter() - started:.0f} s; 1-min load average {os.getloadavg()[0]:.2f} at the end.")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
