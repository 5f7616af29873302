"""How often does a label sample reach the token cap before its logical line ends, as a function of the cap?

Samples K completions for N training prompts from a policy (label's sampling settings), with the largest cap the
policy's context allows (context - max_prompt_tokens), and reports, for each smaller cap, the fraction of samples
that would have been cut mid-line there, plus what the long ones are (an open bracket, a docstring, other).

    python benchmarks/label_cap.py --policy artifacts/pretrain --data data --prompts 96 --k 4
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="artifacts/pretrain")
    p.add_argument("--data", default="data")
    p.add_argument("--prompts", type=int, default=96)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")

    from alignpipe.lm.models import context_length
    from alignpipe.lm.policy import Sampling, load_policy, sample
    from alignpipe.stages.label import Config, load_train_prompts
    from alignpipe.tasks import get_task

    cfg = Config()
    prompts = load_train_prompts(Path(args.data), args.prompts, args.seed)
    model, tok, meta = load_policy(Path(args.policy))
    room = context_length(model) - Sampling.max_prompt_tokens
    sampling = dataclasses.replace(cfg.sampling, max_new_tokens=room, batch_size=128)
    samples = sample(model, tok, meta, [r["prompt"] for r in prompts for _ in range(args.k)], sampling,
                     seed=args.seed, unit=get_task("pep8").completion_unit())
    n = len(samples)
    # a sample that ended its line used len(ids) tokens (the line-end token included): cut at cap c iff it
    # needed more than c tokens, or ran out of room altogether
    need = [room + 1 if s.capped else len(s.completion_ids) for s in samples]
    print(f"{n} samples ({args.prompts} prompts x {args.k}), policy {args.policy}, room for {room} new tokens "
          f"(context {context_length(model)} - prompt {Sampling.max_prompt_tokens})")
    print("| cap (tokens) | samples cut mid-line |\n|---|---|")
    for cap in sorted({16, 24, 32, 40, 48, 56, room} - {c for c in (16, 24, 32, 40, 48, 56) if c > room}):
        print(f"| {cap} | {sum(x > cap for x in need) / n:.3f} |")
    kinds = collections.Counter()
    for s, x in zip(samples, need):
        if x > 32:
            t = s.completion
            kinds['docstring/triple quote' if ('"""' in t or "'''" in t) else
                  "open bracket" if any(c in t for c in "([{") else "other"] += 1
    print("samples longer than 32 tokens, by what keeps their logical line open:", dict(kinds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
