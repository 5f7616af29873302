"""The stages. Each module `alignpipe.stages.<name>` defines, with only light imports at module level:

- `Config`: a frozen `StageConfig` dataclass whose `SECTION` is the stage name (its params.yaml section);
- `INPUTS`: the input paths it reads, as `Input`s (their defaults match dvc.yaml);
- `METRICS`: the metric keys it must write (docs/METRICS.md);
- `run(cfg, inputs, out_dir) -> dict[str, float]`: the stage's whole logic; writes its outputs into `out_dir`
  and returns its metrics. `alignpipe.run.runner.execute` wraps it with tracking, metrics.json and atomic output.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType

# The order of the DAG; one name per stage in params.yaml, dvc.yaml, the CLI, the components and MLflow.
STAGE_NAMES = ("validate", "pretrain", "label", "reward", "dpo", "ppo", "grpo", "evaluate", "export", "register")

# The stages that can train on several GPUs (torchrun/DDP): the KFP components take a `launcher`, the pipeline
# asks for `<stage>.gpus` GPUs, and `pipeline trainjob` writes multi-node jobs for them (ppo stays single-process).
MULTI_GPU = ("pretrain", "reward", "dpo")

# One line per stage for `alignpipe --help` (the stage modules are imported only when their command runs).
STAGE_HELP = {
    "data": "build the dataset: the default PEP8 corpus, or --dataset PATH_OR_ID (data build)",
    "validate": "check corpus and preference files with Great Expectations suites",
    "pretrain": "pretrain with human preferences (PHF objectives: mle, filter, conditional, ...)",
    "label": "RLAIF: sample completion pairs and let a judge label them",
    "reward": "train a reward model on preference pairs (TRL RewardTrainer)",
    "dpo": "direct preference optimisation against a frozen reference (TRL DPOTrainer)",
    "ppo": "PPO against the reward model with a KL penalty to the reference",
    "grpo": "GRPO (TRL GRPOTrainer) against a reward: the oracle, the reward model or your function",
    "evaluate": "compare every candidate policy on held-out prompts",
    "export": "export the policy and reward model to ONNX, checked against PyTorch",
    "register": "register the best candidate in the MLflow registry behind a quality gate",
}


@dataclass(frozen=True)
class Input:
    """One input path of a stage: its flag name (`--<name>`), default path and help."""

    name: str
    default: str | None
    help: str
    required: bool = True


def load_stage(name: str) -> ModuleType:
    """Import `alignpipe.stages.<name>`; KeyError naming the stages for an unknown name."""
    if name not in STAGE_NAMES and name != "data":
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")
    return importlib.import_module(f"alignpipe.stages.{name}")


class ConfigClasses(Mapping):
    """Section name -> Config class for `data` and every stage, importing a stage module on first use."""

    _names = ("data", *STAGE_NAMES)

    def __getitem__(self, name: str):
        if name not in self._names:
            raise KeyError(name)
        return load_stage(name).Config

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def config_classes() -> ConfigClasses:
    """Section name -> Config class, for `data` and every stage."""
    return ConfigClasses()
