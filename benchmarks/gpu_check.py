"""Run one alignpipe stage in-process and record what a GPU check needs (used by benchmarks/gpu_check.sh).

    python benchmarks/gpu_check.py run RESULTS.jsonl -- STAGE --params ... --set ... --out DIR
    python benchmarks/gpu_check.py report RESULTS.jsonl > gpu_check.md

`run` calls `alignpipe.cli.main` with the arguments after `--` and appends one JSON line to RESULTS.jsonl: the exit
code, wall seconds, whether CUDA was there (device name, bf16 support), the peak GPU memory PyTorch allocated and
reserved during the stage, every `torch.autocast` the stage entered (device type, dtype), the devices the model
parameters lived on when the stage's models were trained (Trainer.train / the training loops), the Trainer's own
TrainOutput metrics (reward, dpo), the stage's metrics.json, and the traceback when the stage raised.
`report` turns RESULTS.jsonl into a Markdown table.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path


def _hooks(record: dict):
    """Patch torch.autocast and transformers.Trainer.train to record what the stage actually used."""
    import torch

    autocasts = record.setdefault("autocast", [])
    original_init = torch.autocast.__init__

    def init(self, device_type, dtype=None, enabled=True, cache_enabled=None):
        original_init(self, device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)
        key = f"{device_type}:{str(self.fast_dtype).replace('torch.', '')}:{'on' if enabled else 'off'}"
        if key not in autocasts:
            autocasts.append(key)

    torch.autocast.__init__ = init

    try:
        import transformers
    except ImportError:
        return
    original_train = transformers.Trainer.train

    def train(self, *args, **kwargs):
        record["trainer_model_device"] = str(next(self.model.parameters()).device)
        record["trainer_args"] = {"bf16": bool(self.args.bf16), "fp16": bool(self.args.fp16),
                                  "device": str(self.args.device), "n_gpu": int(self.args.n_gpu),
                                  "per_device_train_batch_size": self.args.per_device_train_batch_size}
        out = original_train(self, *args, **kwargs)
        record["trainer_metrics"] = dict(out.metrics)
        record["trainer_global_step"] = int(out.global_step)
        return out

    transformers.Trainer.train = train


def _model_device_hook(record: dict):
    """Record the device and dtype of the first parameter of every model moved with .to() (policies, reward
    models, the pretrain network)."""
    import torch

    seen = record.setdefault("model_to", [])
    original_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        out = original_to(self, *args, **kwargs)
        try:
            p = next(self.parameters())
            key = f"{type(self).__name__}@{p.device}/{str(p.dtype).replace('torch.', '')}"
            if key not in seen and len(seen) < 20:
                seen.append(key)
        except StopIteration:
            pass
        return out

    torch.nn.Module.to = to


def run(results: Path, argv: list[str]) -> int:
    import torch

    record: dict = {"argv": argv, "stage": argv[0] if argv else "?"}
    record["cuda_available"] = torch.cuda.is_available()
    record["torch"] = torch.__version__
    if torch.cuda.is_available():
        record["device_name"] = torch.cuda.get_device_name(0)
        record["bf16_supported"] = torch.cuda.is_bf16_supported()
        torch.cuda.reset_peak_memory_stats()
    try:
        import transformers
        import trl
        record["transformers"] = transformers.__version__
        record["trl"] = trl.__version__
    except ImportError as e:
        record["import_error"] = repr(e)
    _hooks(record)
    _model_device_hook(record)
    print(f"gpu_check: {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    rc = 1
    try:
        from alignpipe.cli.main import main

        rc = main(argv)
    except BaseException as e:  # noqa: BLE001 - a check records every failure
        record["traceback"] = traceback.format_exc()
        traceback.print_exc()
        rc = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1
    record["rc"] = rc
    record["wall_s"] = round(time.perf_counter() - start, 2)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        record["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        record["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    out = argv[argv.index("--out") + 1] if "--out" in argv else None
    if out and (Path(out) / "metrics.json").is_file():
        record["metrics"] = json.loads((Path(out) / "metrics.json").read_text())
    with results.open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")
    print(f"gpu_check: {record['stage']} rc={rc} wall={record['wall_s']}s "
          f"peak_alloc={record.get('peak_alloc_gib')}GiB autocast={record.get('autocast')} "
          f"models={record.get('model_to')}", flush=True)
    return rc


def _fmt(v, digits=4):
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def report(results: Path) -> str:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    lines = []
    if rows:
        r0 = rows[0]
        lines.append(f"Device: {r0.get('device_name', 'no CUDA device')} (cuda_available={r0.get('cuda_available')}, "
                     f"bf16_supported={r0.get('bf16_supported')}); torch {r0.get('torch')}, transformers "
                     f"{r0.get('transformers')}, trl {r0.get('trl')}.")
        lines.append("")
    lines.append("| stage | rc | wall s | train s | steps | throughput | final loss | train TFLOP/s | peak alloc GiB "
                 "| peak reserved GiB | autocast seen | model devices |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r.get("metrics", {})
        tm = r.get("trainer_metrics", {})
        stage = r["stage"]
        steps = train_s = thr = loss = tflops = None
        if stage == "pretrain":
            steps = _set_value(r["argv"], "pretrain.max_steps")
            train_s = m.get("train_seconds")
            thr = m.get("tokens_per_s") and f"{m['tokens_per_s']:.0f} tok/s"
            loss = m.get("final_train_loss")
            tflops = m.get("train_tflops")
        elif stage == "label":
            train_s = m.get("sampling_seconds")
            thr = m.get("n_samples") and train_s and f"{m['n_samples'] / train_s:.1f} samples/s (sampling)"
            steps = m.get("n_pairs") and f"{m['n_pairs']} pairs"
        elif stage in ("reward", "dpo"):
            steps = r.get("trainer_global_step", m.get("train_steps"))
            train_s = tm.get("train_runtime", m.get("train_seconds"))
            sps = tm.get("train_samples_per_second", m.get("train_samples_per_s"))
            thr = sps and f"{sps:.1f} pairs/s"
            loss = m.get("train_loss", tm.get("train_loss"))
            if tm.get("total_flos") and tm.get("train_runtime"):
                tflops = tm["total_flos"] / tm["train_runtime"] / 1e12
        elif stage == "ppo":
            steps = _set_value(r["argv"], "ppo.max_steps")
            train_s = m.get("train_seconds")
            thr = m.get("tokens_per_s") and f"{m['tokens_per_s']:.0f} completion tok/s"
            loss = None
        lines.append(f"| {stage} | {r['rc']} | {_fmt(r.get('wall_s'))} | {_fmt(train_s)} | {_fmt(steps)} | "
                     f"{_fmt(thr)} | {_fmt(loss)} | {_fmt(tflops, 3)} | {_fmt(r.get('peak_alloc_gib'))} | "
                     f"{_fmt(r.get('peak_reserved_gib'))} | {', '.join(r.get('autocast', [])) or '-'} | "
                     f"{', '.join(r.get('model_to', []))[:200] or '-'} |")
    lines.append("")
    for r in rows:
        lines.append(f"### {r['stage']} (rc {r['rc']})")
        lines.append("")
        lines.append("```")
        lines.append("alignpipe " + " ".join(r["argv"]))
        if r.get("trainer_args"):
            lines.append(f"Trainer args: {json.dumps(r['trainer_args'])}; model on {r.get('trainer_model_device')}")
        if r.get("trainer_metrics"):
            lines.append(f"TrainOutput: {json.dumps(r['trainer_metrics'])}")
        lines.append(f"metrics.json: {json.dumps(r.get('metrics', {}))}")
        if r.get("traceback"):
            lines.append(r["traceback"].rstrip())
        lines.append("```")
        lines.append("")
    return "\n".join(lines)


def _set_value(argv: list[str], key: str):
    for i, a in enumerate(argv):
        if a == "--set" and i + 1 < len(argv) and argv[i + 1].startswith(key + "="):
            return argv[i + 1].split("=", 1)[1]
    return None


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "run":
        argv = sys.argv[3:]
        if argv and argv[0] == "--":
            argv = argv[1:]
        sys.exit(run(Path(sys.argv[2]), argv))
    if len(sys.argv) == 3 and sys.argv[1] == "report":
        print(report(Path(sys.argv[2])))
        sys.exit(0)
    print(__doc__, file=sys.stderr)
    sys.exit(2)
