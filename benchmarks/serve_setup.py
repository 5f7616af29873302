"""A registry to load-test serving with: a policy and reward model exported (`alignpipe export`) and registered
(`alignpipe register --export`), so that `models:/alignpipe-policy@champion` (transformers flavor) and
`models:/alignpipe-policy-onnx@champion` (the ONNX pyfunc) serve the same weights.

    MLFLOW_TRACKING_URI=sqlite:///$PWD/.tmp/serve/mlflow.db \
        python benchmarks/serve_setup.py --policy artifacts/pretrain --reward artifacts/reward --out .tmp/serve

Without --policy/--reward it builds UNTRAINED models of the default pipeline's shape (pretrain's Config defaults:
GPT-2 192d/4L/3 heads, a 2048-token BPE trained on a slice of the stdlib, conditional objective): the serving cost
per token is the same as a trained model's, but an untrained model rarely finishes a line, so its answers run to
max_new_tokens (the most work per request).
"""

from __future__ import annotations

import argparse
import shutil
import sysconfig
from pathlib import Path

from alignpipe.core.hashing import weights_sha256
from alignpipe.run.runner import execute
from alignpipe.reports.candidates import write_best
from alignpipe.stages import export, pretrain, register


def untrained_models(out: Path, seed: int = 0) -> tuple[Path, Path]:
    """(policy dir, reward dir) of the default shape, random weights, a tokenizer trained on stdlib code."""
    import torch
    from transformers import GPT2ForSequenceClassification

    from alignpipe.lm.models import build_model
    from alignpipe.lm.policy import PolicyMeta, save_policy
    from alignpipe.lm.tokenizers import train_tokenizer

    cfg = pretrain.Config()
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:120]
    tok = train_tokenizer((f.read_text(encoding="utf-8", errors="replace") for f in files), cfg.vocab_size,
                          indent=cfg.tokenizer_indent)
    torch.manual_seed(seed)
    model = build_model(tok, cfg.n_embd, cfg.n_layer, cfg.n_head, max(cfg.seq_len, 256))
    meta = PolicyMeta(objective="conditional", prompt_suffix="<|aligned|>", bad_words=("<|misaligned|>",),
                      strip_tokens=("<|aligned|>", "<|misaligned|>"))
    save_policy(model, tok, meta, out / "policy")
    reward = GPT2ForSequenceClassification(model.config.__class__(**{**model.config.to_dict(), "num_labels": 1}))
    reward.save_pretrained(str(out / "reward"), safe_serialization=True)
    tok.save_pretrained(str(out / "reward"))
    return out / "policy", out / "reward"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", help="policy directory (default: an untrained one of the default shape)")
    parser.add_argument("--reward", help="reward model directory (default: an untrained one)")
    parser.add_argument("--out", default=".tmp/serve", help="working directory (default: %(default)s)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    policy, reward = (Path(args.policy), Path(args.reward)) if args.policy else untrained_models(out)
    ev = out / "evaluate"
    ev.mkdir(exist_ok=True)
    shutil.rmtree(ev / "best", ignore_errors=True)  # this script's own folder, from an earlier run
    best = write_best({"best_candidate": "pretrain", "candidates": {"pretrain": {
        "path": str(policy.resolve()), "weights_sha256": weights_sha256(policy)}}}, ev)
    execute("export", export.Config(), {"best": best, "reward_model": reward}, out / "export")
    execute("register", register.Config(), {"best": best, "reward_model": reward, "export": out / "export"},
            out / "register")


if __name__ == "__main__":
    main()
