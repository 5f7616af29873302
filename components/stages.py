"""One KFP v2 lightweight component per stage: the same `run(cfg, inputs, out_dir)` as the CLI and DVC.

Each body is serialized into the compiled YAML and runs in the pinned image (components/image.py), where
alignpipe and this package are installed: it imports inside the function, as KFP requires, and hands over to
`components.runtime.run_stage`. Parameters: `config` (the stage's params.yaml section), `env` (MLflow URI, git
commit, data version; empty values are skipped) and, for the stages that scale to several GPUs, `launcher`
([] = in process, else e.g. torchrun). Inputs and outputs keep the stage modules' INPUTS names; the main output
is named as the downstream stages call it. Resources, GPUs and caching are set in pipelines/, not here.
"""

# No `from __future__ import annotations`: KFP reads the real annotation objects.
from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from alignpipe.stages import MULTI_GPU  # noqa: F401 (the stages whose component takes a `launcher`)
from components.image import CPU_IMAGE, GPU_IMAGE


# install_kfp_package=False: the image already has the pinned kfp, so pods start without pip (and offline).
@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def data(config: dict, env: dict, input_limits: dict, data: Output[Dataset], metrics: Output[Metrics],
         corpus: Input[Dataset] = None):
    """data build: train/val/test chunks and held-out prompts (from the image's stdlib or a user corpus)."""
    from components.runtime import run_stage

    run_stage("data", config, {"corpus": corpus}, data, metrics, env, input_limits=input_limits)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def validate(config: dict, env: dict, corpus: Input[Dataset], validation: Output[Artifact],
             report_html: Output[HTML], metrics: Output[Metrics], prefs: Input[Dataset] = None):
    """validate: Great Expectations suites on the corpus (and human preferences); the results page to the UI
    (the full GX Data Docs site stays in the `validation` artifact)."""
    from components.runtime import copy_file, run_stage

    run_stage("validate", config, {"corpus": corpus, "prefs": prefs}, validation, metrics, env)
    copy_file(f"{validation.path}/report.html", report_html.path)


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def pretrain(config: dict, env: dict, launcher: list, data: Input[Dataset], policy: Output[Model],
             metrics: Output[Metrics]):
    """pretrain: the policy, trained with human preferences (PHF objectives)."""
    from components.runtime import run_stage

    run_stage("pretrain", config, {"data": data}, policy, metrics, env, launcher)


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def label(config: dict, env: dict, input_limits: dict, data: Input[Dataset], policy: Input[Model],
          prefs: Output[Dataset], metrics: Output[Metrics], judge_model: Input[Model] = None,
          human_prefs: Input[Dataset] = None):
    """label: sampled completion pairs labelled by a judge (RLAIF), plus optional human preferences."""
    from components.runtime import run_stage

    run_stage("label", config, {"data": data, "policy": policy, "judge_model": judge_model,
                                "human_prefs": human_prefs}, prefs, metrics, env, input_limits=input_limits)


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def reward(config: dict, env: dict, launcher: list, input_limits: dict, prefs: Input[Dataset], policy: Input[Model],
           reward_model: Output[Model], metrics: Output[Metrics]):
    """reward: a reward model trained on the preference pairs."""
    from components.runtime import run_stage

    run_stage("reward", config, {"prefs": prefs, "policy": policy}, reward_model, metrics, env, launcher,
              input_limits)


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def dpo(config: dict, env: dict, launcher: list, input_limits: dict, data: Input[Dataset], policy: Input[Model],
        prefs: Input[Dataset], dpo: Output[Model], metrics: Output[Metrics], human_prefs: Input[Dataset] = None):
    """dpo: direct preference optimisation of the policy against its frozen copy."""
    from components.runtime import run_stage

    run_stage("dpo", config, {"data": data, "policy": policy, "prefs": prefs, "human_prefs": human_prefs}, dpo,
              metrics, env, launcher, input_limits)


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def ppo(config: dict, env: dict, data: Input[Dataset], policy: Input[Model], reward_model: Input[Model],
        ppo: Output[Model], metrics: Output[Metrics]):
    """ppo: RL against the reward model with a KL penalty to the reference policy."""
    from components.runtime import run_stage

    run_stage("ppo", config, {"data": data, "policy": policy, "reward_model": reward_model}, ppo, metrics, env)


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def grpo(config: dict, env: dict, data: Input[Dataset], policy: Input[Model], grpo: Output[Model],
         metrics: Output[Metrics], reward_model: Input[Model] = None):
    """grpo: group-relative RL (TRL GRPOTrainer) against the configured reward (oracle, reward model, function)."""
    from components.runtime import run_stage

    run_stage("grpo", config, {"data": data, "policy": policy, "reward_model": reward_model}, grpo, metrics, env)


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def evaluate(config: dict, env: dict, data: Input[Dataset], policy: Input[Model], dpo: Input[Model],
             reward_model: Input[Model], evaluation: Output[Artifact], report: Output[Markdown],
             report_html: Output[HTML], metrics: Output[Metrics], ppo: Input[Model] = None,
             grpo: Input[Model] = None, prompts: Input[Dataset] = None):
    """evaluate: every candidate on held-out prompts; the report (Markdown, and a page with the plots) to the UI."""
    from components.runtime import copy_file, run_stage

    run_stage("evaluate", config, {"data": data, "policy": policy, "dpo": dpo, "ppo": ppo, "grpo": grpo,
                                   "reward_model": reward_model, "prompts": prompts},
              evaluation, metrics, env)
    copy_file(f"{evaluation.path}/report.md", report.path)
    copy_file(f"{evaluation.path}/report.html", report_html.path)


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def export(config: dict, env: dict, evaluation: Input[Artifact], policy: Input[Model], dpo: Input[Model],
           reward_model: Input[Model], data: Input[Dataset], export: Output[Model], metrics: Output[Metrics],
           ppo: Input[Model] = None, grpo: Input[Model] = None):
    """export: the chosen policy and the reward model to ONNX, checked against PyTorch."""
    from components.runtime import run_stage

    run_stage("export", config, {"evaluation": evaluation, "policy": policy, "dpo": dpo, "ppo": ppo, "grpo": grpo,
                                 "reward_model": reward_model, "data": data}, export, metrics, env)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def register(config: dict, env: dict, evaluation: Input[Artifact], policy: Input[Model], dpo: Input[Model],
             reward_model: Input[Model], export: Input[Model], registry: Output[Artifact],
             metrics: Output[Metrics], ppo: Input[Model] = None, grpo: Input[Model] = None):
    """register: the best candidate in the MLflow registry, behind a quality gate."""
    from components.runtime import run_stage

    run_stage("register", config, {"evaluation": evaluation, "policy": policy, "dpo": dpo, "ppo": ppo, "grpo": grpo,
                                   "reward_model": reward_model, "export": export}, registry, metrics, env)


# Stage name -> component, in DAG order (the names of params.yaml sections, CLI commands and DVC stages).
COMPONENTS = {c.name: c for c in (data, validate, pretrain, label, reward, dpo, ppo, grpo, evaluate, export,
                                          register)}
