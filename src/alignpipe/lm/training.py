"""Language-model training pieces: process set-up (DDP under torchrun), the packed token blocks and their order, the
model with an optional value head, AdamW with warmup and linear decay; and the one checkpoint/resume helper of every
training stage (`resume_checkpoint`: which checkpoint a `--resume` continues from, or clearing a fresh run's old
ones; `new_checkpoint`: an atomic save keeping the newest; `train_from` for a transformers Trainer), with checkpoints
that resume only a run with the same training config."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from alignpipe.core.errors import ConfigError, DataError, loading


@dataclass(frozen=True)
class Process:
    """Where this process trains: its rank among `world` processes and its device."""

    world: int
    rank: int
    device: str

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_process(device: str) -> Process:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPUs); each process takes its local
    GPU (`LOCAL_RANK`)."""
    import torch
    import torch.distributed as dist

    from alignpipe.core import distributed

    world, rank = distributed.world_size(), distributed.process_rank()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return Process(world, rank, device)


def token_blocks(ids, scores, seq_len: int, global_batch: int, max_steps: int, seed: int):
    """(blocks [n, seq_len], their token scores, the order of blocks over all steps): the stream cut into blocks,
    visited in a fresh seeded permutation each epoch for as many epochs as `max_steps` global batches need."""
    import numpy as np
    import torch

    n_blocks = len(ids) // seq_len
    if n_blocks < global_batch:
        raise ConfigError("pretrain.batch_size", f"the corpus has only {n_blocks} sequences of {seq_len} tokens")
    blocks = torch.from_numpy(ids[:n_blocks * seq_len].reshape(n_blocks, seq_len))
    block_scores = torch.from_numpy(scores[:n_blocks * seq_len].reshape(n_blocks, seq_len))
    epochs = -(-max_steps * global_batch // n_blocks)
    order_rng = np.random.default_rng(seed)
    order = np.concatenate([order_rng.permutation(n_blocks) for _ in range(epochs)])
    return blocks, block_scores, order


def lm_with_value(model, with_value: bool):
    """The trained module: the LM plus, for AWR, a linear value head on the last hidden state; its forward returns
    (logits, values or None)."""
    import torch

    class LMWithValue(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = model
            self.value = torch.nn.Linear(model.config.hidden_size, 1) if with_value else None

        def forward(self, input_ids):
            out = self.lm(input_ids=input_ids, output_hidden_states=self.value is not None, use_cache=False)
            values = self.value(out.hidden_states[-1]).squeeze(-1) if self.value is not None else None
            return out.logits, values

    return LMWithValue()


def make_optimizer(net, lr: float, weight_decay: float, warmup_frac: float, max_steps: int, schedule: str = "linear"):
    """(AdamW, scheduler): weight decay on matrices only, betas (0.9, 0.95); linear warmup over `warmup_frac` of the
    steps (at least one), then decay to 0 at `max_steps`, linear or cosine (`schedule`)."""
    import math

    import torch

    decay = [p for p in net.parameters() if p.dim() >= 2]
    no_decay = [p for p in net.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), fused=True)
    warmup = max(int(warmup_frac * max_steps), 1)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        left = max(0.0, (max_steps - step) / max(max_steps - warmup, 1))  # 1 after warmup, 0 at max_steps
        return left if schedule == "linear" else 0.5 * (1 - math.cos(math.pi * left))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)


def logged_train_loss(log_history: list[dict]) -> float:
    """The mean training loss over the steps of a transformers Trainer's logged windows (each `loss` entry covers
    the steps since the previous one). Unlike `TrainOutput.training_loss` it covers the whole run after a resume:
    the log history is restored from the checkpoint, the Trainer's running loss sum is not. Steps after the last
    logged window are not counted; NaN when no window was logged."""
    total, steps, previous = 0.0, 0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            total += float(entry["loss"]) * (entry["step"] - previous)
            steps += entry["step"] - previous
            previous = entry["step"]
    return total / steps if steps else float("nan")


def checkpoints(directory: Path, prefix: str = "step") -> list[Path]:
    """The `<prefix>-N` checkpoint folders in `directory`, oldest first (a `step-N.tmp` left by a kill mid-save is
    not one)."""
    name = re.compile(rf"^{re.escape(prefix)}-(\d+)$")
    found = [p for p in Path(directory).glob(f"{prefix}-*") if name.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(name.match(p.name).group(1)))


def checkpoint_problem(path: Path, required: tuple[str, ...]) -> str | None:
    """Why checkpoint folder `path` cannot be resumed, or None: a `required` file is missing (`a|b`: either), or a
    file in it is truncated or corrupt (safetensors header and length, torch.save zip archive, JSON)."""
    import zipfile

    from safetensors import SafetensorError, safe_open

    for need in required:
        if not any((path / name).is_file() for name in need.split("|")):
            return f"{need.replace('|', ' or ')} is missing (killed while saving?)"
    for file in sorted(f for f in path.rglob("*") if f.is_file()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), "pt"):
                    pass
            elif file.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(file) as archive:
                    if archive.testzip() is not None:
                        raise zipfile.BadZipFile("a member fails its CRC check")
            elif file.suffix == ".json":
                json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError, zipfile.BadZipFile, SafetensorError) as e:
            first = (str(e).strip().splitlines() or [""])[0][:120]
            return f"{file.relative_to(path)} is truncated or corrupt ({type(e).__name__}: {first})"
    return None


def latest_complete(directory: str | Path, prefix: str, required: tuple[str, ...], log=print) -> Path | None:
    """The newest `<prefix>-N` checkpoint in `directory` that `checkpoint_problem` finds complete; each newer one is
    skipped, saying why through `log`. None when there is no checkpoint; a DataError when none is complete."""
    found = checkpoints(Path(directory), prefix)
    newest = None
    for path in reversed(found):
        problem = checkpoint_problem(path, required)
        if problem is None:
            return path
        newest = newest or f"{path.name}: {problem}"
        log(f"resume: skipping {path}: {problem}")
    if found:
        raise DataError(str(directory), f"none of the {len(found)} checkpoints is complete (the newest, {newest}); "
                        "drop --resume to start over")
    return None


TRAINER_CHECKPOINT = ("trainer_state.json", "model.safetensors|adapter_model.safetensors")  # written last / weights


def clear_checkpoints(checkpoint_dir: str | Path, prefix: str = "checkpoint") -> None:
    """Remove the `<prefix>-N` checkpoint folders (a partial `<prefix>-N.tmp` too): a fresh run must not resume or
    mix with an old one. `prefix` "checkpoint": a transformers Trainer's."""
    for path in Path(checkpoint_dir).glob(f"{prefix}-*"):
        if path.is_dir():
            shutil.rmtree(path)


def resume_checkpoint(cfg, checkpoint_dir: str | Path, prefix: str = "checkpoint",
                      required: tuple[str, ...] = TRAINER_CHECKPOINT, must_exist: bool = True) -> Path | None:
    """The one resume rule of the training stages: with `cfg.resume`, the newest complete `<prefix>-N` folder in
    `checkpoint_dir` (`latest_complete`: each newer corrupt one skipped with a line on stderr); when there is none,
    an error naming `<stage>.resume`, or with `must_exist=False` a line on stderr and a start from step 0. A fresh
    run (no resume) clears the old `<prefix>-N` folders. Rank 0 alone speaks and clears (the other ranks never read
    a fresh run's checkpoints). Defaults: a transformers Trainer's `checkpoint-N` folders."""
    import sys

    from alignpipe.core import distributed

    stage, directory, main = cfg.section(), Path(checkpoint_dir), distributed.is_main_process()
    if cfg.resume:
        say = (lambda m: print(f"{stage}: {m}", file=sys.stderr)) if main else (lambda m: None)
        found = latest_complete(directory, prefix, required, log=say)
        if found is None and must_exist:
            raise DataError(str(directory), f"{stage}.resume is set but there is no {prefix}-N checkpoint to "
                                            "resume from")
        if found is None:
            say(f"no checkpoint in {directory}; starting from step 0")
        elif required == TRAINER_CHECKPOINT:  # the Trainer unpickles its state; our own loaders use weights_only
            check_torch_files(found)
        return found
    if main:
        clear_checkpoints(directory, prefix)
    return None


@contextlib.contextmanager
def new_checkpoint(directory: str | Path, name: str, prefix: str, keep: int = 2):
    """A folder to write checkpoint `<directory>/<name>` into, published atomically (written as `<name>.tmp`, then
    renamed: a kill mid-save leaves nothing `latest_complete` takes), after which only the newest `keep`
    `<prefix>-N` checkpoints are kept."""
    path = Path(directory) / name
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    for old in checkpoints(Path(directory), prefix)[:-keep]:
        shutil.rmtree(old)


def check_torch_files(checkpoint: Path) -> None:
    """Every torch file of a Trainer checkpoint (optimizer, scheduler, RNG and scaler state) read with
    `weights_only=True` before the Trainer does, so a pickle that would run code is refused with one line naming
    the file, before any training (never unpickled)."""
    import pickle

    import torch
    from transformers.trainer_pt_utils import safe_globals  # the numpy types of the Trainer's own rng_state.pth

    for path in sorted([*checkpoint.glob("*.pt"), *checkpoint.glob("*.pth"), *checkpoint.glob("*.bin")]):
        if path.name == "training_args.bin":  # the pickled TrainingArguments, for people: a resume never loads it
            continue
        with loading(path, "checkpoint state (truncated or corrupt)"):
            try:
                with safe_globals():  # the allowlist the Trainer loads its RNG state with (weights_only=True)
                    torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError:
                raise DataError(str(path), "holds pickled Python objects, not only tensors: refused, never "
                                "unpickled (remove this checkpoint or drop --resume)") from None


def train_from(trainer, checkpoint: str | Path | None):
    """`trainer.train(resume_from_checkpoint=checkpoint)`, except from a checkpoint of the last step (a run killed
    during its evaluation or publishing): there a resumed Trainer whose epoch is not finished trains one step past
    max_steps, so the weights and the state (log history included) are restored without training. Returns the
    TrainOutput (its training_loss then the logged windows' mean, its metrics empty)."""
    from transformers import TrainerState
    from transformers.trainer_utils import TrainOutput

    checkpoint = str(checkpoint) if checkpoint is not None else None
    if checkpoint is not None and trainer.args.max_steps > 0:
        state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
        if state.global_step >= trainer.args.max_steps:
            trainer._load_from_checkpoint(checkpoint)  # the Trainer's own loader (safetensors, PEFT adapters)
            trainer.state = state
            return TrainOutput(state.global_step, logged_train_loss(state.log_history), {})
    return trainer.train(resume_from_checkpoint=checkpoint)


def log_at_checkpoints():
    """A TrainerCallback that logs (flushes the running loss and TRL's metric averages) at every checkpoint before
    the last step. A resumed Trainer restarts its running sums at the checkpoint's step, so a logged window that
    spans a checkpoint would average fewer steps after a resume; with a log at each checkpoint, the uninterrupted
    and the resumed run log the same windows. No effect when save_steps is a multiple of logging_steps."""
    from transformers import TrainerCallback

    class LogAtCheckpoints(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save and state.global_step < state.max_steps:
                control.should_log = True
            return control

    return LogAtCheckpoints()


STEP_CHECKPOINT = ("state.pt", "fingerprint.json")  # what save_checkpoint writes


def save_checkpoint(directory: Path, step: int, net, opt, sched, fingerprint: dict, keep: int = 2,
                    progress: dict | None = None) -> None:
    """Write `step-N` atomically (`new_checkpoint`) and keep the newest `keep`; `progress` (e.g. the last
    logged loss) goes to its progress.json, for the metrics of a run resumed from it."""
    import torch

    from alignpipe.core.io import write_json

    with new_checkpoint(directory, f"step-{step:07d}", "step", keep) as tmp:
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "step": step}, tmp / "state.pt")
        write_json(tmp / "fingerprint.json", fingerprint)
        write_json(tmp / "progress.json", progress or {})


def checkpoint_progress(path: Path) -> dict:
    """What `save_checkpoint` recorded as `progress` in checkpoint `path` ({} for an older checkpoint)."""
    from alignpipe.core.io import read_json

    return read_json(path / "progress.json") if (path / "progress.json").is_file() else {}


def load_checkpoint(path: Path, net, opt, sched, fingerprint: dict, device, ignore: tuple[str, ...] = ()) -> int:
    """Restore `path` into net, opt and sched; returns its step. Raises ConfigError when the saved fingerprint
    differs from `fingerprint` on a key not in `ignore` (a checkpoint resumes only the run that wrote it)."""
    import torch

    from alignpipe.core.io import read_json

    with loading(path / "state.pt", "checkpoint (truncated or corrupt)"):
        state = torch.load(path / "state.pt", map_location=device, weights_only=True)
    saved = read_json(path / "fingerprint.json")
    diff = [k for k in fingerprint if saved.get(k) != fingerprint.get(k) and k not in ignore]
    if diff:
        raise ConfigError(f"pretrain.{diff[0]}", f"differs from the checkpoint in {path} ({saved.get(diff[0])!r}); "
                          "resume with the same config or drop --resume")
    with loading(path / "state.pt", "checkpoint (does not fit this model)"):
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        return int(state["step"])
