"""fp32 vs bf16 on this CPU (issue 15): GEMM rates at the default pretrain model's shapes, and whole training steps
of that model (GPT-2 192d/4L, batch 16 x 256 tokens) in fp32 and under bf16 autocast (what `pretrain.precision:
auto` picks where the CPU reports avx512_bf16). Contenders are interleaved and the median of `--repeats` is kept,
so a load that changes slowly hits both alike; writes `benchmarks/results/precision.md`.

    python benchmarks/precision.py [--repeats 7] [--threads 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="benchmarks/results/precision.md")
    args = p.parse_args(argv)
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from alignpipe.lm.models import bf16_supported

    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    rows = []
    for m, k, n in ((4096, 192, 768), (4096, 768, 192), (4096, 192, 2048), (2048, 2048, 2048)):
        a32, b32 = torch.randn(m, k), torch.randn(k, n)
        a16, b16 = a32.bfloat16(), b32.bfloat16()
        t32, t16 = [], []
        for _ in range(args.repeats):  # interleaved
            t32 += timed(lambda: a32 @ b32, 1)
            t16 += timed(lambda: a16 @ b16, 1)
        flops = 2 * m * k * n
        rows.append((f"GEMM {m}x{k}x{n}", flops / statistics.median(t32) / 1e9, flops / statistics.median(t16) / 1e9,
                     "GFLOP/s"))

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=2048, n_embd=192, n_layer=4, n_head=3, n_positions=256))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 2048, (16, 256))

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(False), step(True)  # warm-up
    s32, s16 = [], []
    for _ in range(args.repeats):
        s32 += timed(lambda: step(False), 1)
        s16 += timed(lambda: step(True), 1)
    tokens = x.numel()
    rows.append(("pretrain step (16 x 256 tokens)", tokens / statistics.median(s32), tokens / statistics.median(s16),
                 "tokens/s"))
    lines = ["# fp32 vs bf16 on this CPU (issue 15)", "",
             f"`python benchmarks/precision.py {' '.join(argv or [])}`: {os.cpu_count()} CPUs, torch "
             f"{torch.__version__}, {torch.get_num_threads()} threads, avx512_bf16 "
             f"{torch.cpu._is_avx512_bf16_supported()}, AMX {torch.cpu._is_amx_tile_supported()} "
             f"(`bf16_supported()` = {bf16_supported()}: what `precision: auto` follows). Median of {args.repeats}, "
             f"fp32 and bf16 interleaved; load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at "
             "the end (a shared machine: the ratio is the figure, not the absolute rates).", "",
             "| what | fp32 | bf16 | bf16 / fp32 | unit |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {a:.1f} | {b:.1f} | {b / a:.2f}x | {unit} |" for name, a, b, unit in rows]
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
