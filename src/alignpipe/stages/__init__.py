"""The stages. Each module `alignpipe.stages.<name>` defines, with only light imports at module level:

- `Config`: a frozen `StageConfig` dataclass whose `SECTION` is the stage name (its params.yaml section), each
  field `field(default, help, ...)` with its constraints (`ge=`, `le=`, `choices=`, ...; core/config.py), only
  cross-field checks in `__post_init__` (after `super().__post_init__()`), old key names in `RENAMED`; the keys
  several stages share as one group (`sampling: Sampling = field(Sampling(...), help)`, `evaluate.sampling.top_p`),
  the stage's defaults written once, on that field;
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

@dataclass(frozen=True)
class Stage:
    """One stage in the registry: everything the CLI, dvc.yaml, the KFP components and the DAG need to know."""

    name: str  # the params.yaml section, CLI command, DVC stage, KFP component and MLflow run name
    help: str  # its line in `alignpipe --help`
    output: str  # its main output, named as the inputs of the stages downstream call it
    candidate: bool = False  # writes a policy that evaluate compares (and may pick as `best`)
    multi_gpu: bool = False  # trains on several GPUs under torchrun/DDP (KFP: a `launcher`; `pipeline trainjob`)
    switch: bool = False  # KFP: a `run_<name>` pipeline parameter (and `--no-<name>`) can leave it out of a run
    curves: bool = False  # logs per-step curves (dvc.yaml plots)


# The stages in DAG order (`data` is built by `alignpipe data build`, before them). A new policy-producing stage is
# its stage file plus one line here with candidate=True: evaluate, dvc.yaml, the components and the DAG follow.
STAGES = (
    Stage("validate", "check corpus and preference files with Great Expectations suites", "validation"),
    Stage("pretrain", "pretrain with human preferences (PHF objectives: mle, filter, conditional, ...)", "policy",
          candidate=True, multi_gpu=True, curves=True),
    Stage("label", "RLAIF: sample completion pairs and let a judge label them", "prefs"),
    Stage("reward", "train a reward model on preference pairs (TRL RewardTrainer)", "reward_model", multi_gpu=True,
          curves=True),
    Stage("dpo", "direct preference optimisation against a frozen reference (TRL DPOTrainer)", "dpo", candidate=True,
          multi_gpu=True, curves=True),
    Stage("orpo", "odds-ratio preference optimisation, no reference model (TRL ORPOTrainer)", "orpo",
          candidate=True, curves=True),
    Stage("ppo", "PPO against the reward model with a KL penalty to the reference", "ppo", candidate=True,
          switch=True, curves=True),
    Stage("grpo", "GRPO (TRL GRPOTrainer) against a reward: the oracle, the reward model or your function", "grpo",
          candidate=True),
    Stage("evaluate", "compare every candidate policy on held-out prompts; the chosen one to best/", "evaluation"),
    Stage("export", "export the best policy and the reward model to ONNX, checked against PyTorch", "export"),
    Stage("register", "register the best candidate in the MLflow registry behind a quality gate", "registry"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
# One line per stage for `alignpipe --help` (the stage modules are imported only when their command runs).
STAGE_HELP = {"data": "build the dataset: the default PEP8 corpus, or --dataset PATH_OR_ID (data build)",
              **{s.name: s.help for s in STAGES}}
# Stage name -> its main output (`data` writes the dataset every stage reads as `data`).
OUTPUTS = {"data": "data", **{s.name: s.output for s in STAGES}}
# The stages that can train on several GPUs (torchrun/DDP): the KFP components take a `launcher`, the pipeline
# asks for `<stage>.gpus` GPUs, and `pipeline trainjob` writes multi-node jobs for them.
MULTI_GPU = tuple(s.name for s in STAGES if s.multi_gpu)
# The stages a run can leave out (KFP: a `run_<stage>` pipeline parameter, `pipeline compile --no-<stage>`).
SWITCHED = tuple(s.name for s in STAGES if s.switch)
# The policies evaluate compares, as (stage, output): the reference first (it is a candidate too), then the rest
# in registry order, which is evaluate's order of candidates.
REFERENCE = "pretrain"
CANDIDATES = tuple((s.name, s.output) for s in sorted((s for s in STAGES if s.candidate),
                                                         key=lambda s: s.name != REFERENCE))


@dataclass(frozen=True)
class Input:
    """One input path of a stage: its flag name (`--<name>`), default path, help, and whether it is required."""

    name: str
    default: str | None
    help: str
    required: bool = True
    # An optional input without a default (taken only when given): the path dvc.yaml passes it (a stage's output).
    pipeline_path: str | None = None


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
