"""The Kubeflow DAG: data -> validate -> pretrain -> label -> reward -> dpo, grpo, [ppo] -> evaluate -> export ->
register.

Wiring only: which output feeds which input, per-task CPU/memory/GPU, node selectors and tolerations, caching,
the MLflow secret. The stage logic is in alignpipe.stages, the components in components/.

- Data: the first task builds it (`data` stage, from the image's stdlib or an imported `corpus`), unless the
  pipeline was compiled with `imports={"data": URI}`: then a `dsl.importer` brings in an existing data/ and its URI
  is the `data_uri` run parameter (a recurring run re-imports it on every run). Likewise `human_prefs` (checked by
  validate, used by label and dpo) and `judge_model` (label's judge) are imported only when given at compile time.
  evaluate's optional `prompts` input is not wired (evaluate reads data's prompts.jsonl).
- PPO is optional at run time: `run_ppo` picks one of two branches. The branch with PPO gives its policy to
  evaluate/export/register as a candidate; the other runs the same three tasks without it. The tail is a
  sub-pipeline because KFP's local runner cannot merge artifacts from two branches (`dsl.OneOf` on artifacts).
- GPUs: the training, sampling and export tasks request `nvidia.com/gpu` and land on GPU nodes; data, validate
  and register run on the CPU image. `gpus[stage]` (pretrain, reward, dpo; default 1) is the GPU request: above 1
  the stage starts under torchrun, one process per GPU; 0 runs it on a CPU node.
"""

import inspect

from kfp import dsl, kubernetes
from kfp.dsl import Dataset, Input, Model

from components import stages as c
from components.stages import MULTI_GPU

PIPELINE_NAME = "alignpipe"
STAGES = tuple(c.COMPONENTS)  # data, validate, pretrain, label, reward, dpo, ppo, grpo, evaluate, export, register

# (CPU cores, memory GiB) per task; GPU tasks get this per GPU.
RESOURCES = {
    "data": (2, 8), "validate": (2, 8), "pretrain": (8, 32), "label": (4, 32), "reward": (4, 32),
    "dpo": (8, 32), "ppo": (8, 32), "grpo": (8, 32), "evaluate": (4, 32), "export": (4, 32), "register": (2, 8),
}
GPU_STAGES = ("pretrain", "label", "reward", "dpo", "ppo", "grpo", "evaluate", "export")
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_LABEL = ("nvidia.com/gpu.present", "true")  # set on GPU nodes by NVIDIA GPU feature discovery
# Never served from the KFP cache: the stages whose outputs or metrics are sampled from the policy, and register,
# whose point is its side effect (a new registry version).
NO_CACHE = ("pretrain", "label", "dpo", "ppo", "grpo", "evaluate", "register")
# Kubernetes secret with the MLflow address and credentials, mounted as env on every task (optional: a cluster
# without it falls back to the `mlflow_tracking_uri` parameter). Each key is the env variable of the same name.
MLFLOW_SECRET = "alignpipe-mlflow"
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                      "MLFLOW_TRACKING_TOKEN", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# Artifacts a pipeline can import instead of producing (compile-time choice; the URI is a run parameter).
IMPORTS = {"data": Dataset, "corpus": Dataset, "human_prefs": Dataset, "judge_model": Model}


def launcher(gpus: int) -> list[str]:
    """How a component starts its stage: in process on one GPU (or none), through torchrun on several."""
    return [] if gpus <= 1 else ["torchrun", "--standalone", "--nproc_per_node", str(gpus), "-m", "alignpipe"]


def _configure(task: dsl.PipelineTask, stage: str, caching: bool, gpus: int = 1) -> dsl.PipelineTask:
    cpus, gib = (n * max(gpus, 1) for n in RESOURCES[stage])
    task.set_display_name(stage).set_cpu_request(str(cpus)).set_memory_request(f"{gib}Gi").set_memory_limit(f"{gib}Gi")
    if stage in GPU_STAGES and gpus > 0:
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(gpus)
        kubernetes.add_node_selector(task, label_key=GPU_NODE_LABEL[0], label_value=GPU_NODE_LABEL[1])
        kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
    task.set_caching_options(caching and stage not in NO_CACHE)
    kubernetes.use_secret_as_env(task, secret_name=MLFLOW_SECRET, secret_key_to_env={k: k for k in MLFLOW_SECRET_KEYS},
                                 optional=True)
    return task


def _given(**artifacts) -> dict:
    """Only the optional inputs that exist (a component's optional input is left out, not passed None)."""
    return {k: v for k, v in artifacts.items() if v is not None}


def _env(mlflow_tracking_uri, git_commit, data_version) -> dict:
    """The `env` parameter of every component (built where the tasks are: KFP's local runner does not resolve a
    dict of pipeline channels handed to a sub-pipeline)."""
    return {"MLFLOW_TRACKING_URI": mlflow_tracking_uri, "ALIGNPIPE_GIT_COMMIT": git_commit,
            "ALIGNPIPE_DATA_VERSION": data_version}


def _release_pipelines(caching: bool):
    """The evaluate -> export -> register sub-pipelines: with the PPO policy as a candidate, and without."""

    def tasks(data, policy, dpo, grpo, reward_model, ppo, evaluate, export, register, run_info) -> None:
        env = _env(**run_info)
        models = dict(policy=policy, dpo=dpo, grpo=grpo, reward_model=reward_model, **_given(ppo=ppo))
        ev = _configure(c.evaluate(config=evaluate, env=env, data=data, **models), "evaluate", caching)
        ex = _configure(c.export(config=export, env=env, evaluation=ev.outputs["evaluation"], data=data, **models),
                        "export", caching)
        _configure(c.register(config=register, env=env, evaluation=ev.outputs["evaluation"],
                              export=ex.outputs["export"], **models), "register", caching)

    def release_with_ppo(data: Input[Dataset], policy: Input[Model], dpo: Input[Model], grpo: Input[Model],
                         reward_model: Input[Model], ppo: Input[Model], evaluate: dict, export: dict, register: dict,
                         mlflow_tracking_uri: str, git_commit: str, data_version: str):
        tasks(data, policy, dpo, grpo, reward_model, ppo, evaluate, export, register,
              dict(mlflow_tracking_uri=mlflow_tracking_uri, git_commit=git_commit, data_version=data_version))

    def release(data: Input[Dataset], policy: Input[Model], dpo: Input[Model], grpo: Input[Model],
                reward_model: Input[Model], evaluate: dict, export: dict, register: dict, mlflow_tracking_uri: str,
                git_commit: str, data_version: str):
        tasks(data, policy, dpo, grpo, reward_model, None, evaluate, export, register,
              dict(mlflow_tracking_uri=mlflow_tracking_uri, git_commit=git_commit, data_version=data_version))

    return (dsl.pipeline(name="release-with-ppo", description="evaluate, export, register; PPO among the candidates")(
                release_with_ppo),
            dsl.pipeline(name="release", description="evaluate, export, register (no PPO policy)")(release))


def _wire(p: dict, gpus: dict[str, int], imports: tuple[str, ...], caching: bool, releases: tuple) -> None:
    run_info = {k: p[k] for k in ("mlflow_tracking_uri", "git_commit", "data_version")}
    env = _env(**run_info)
    imported = {}
    for name in imports:
        task = dsl.importer(artifact_uri=p[f"{name}_uri"], artifact_class=IMPORTS[name], reimport=True)
        imported[name] = task.set_display_name(f"import-{name}").set_caching_options(caching).output
    if "data" in imported:
        data = imported["data"]
    else:
        data = _configure(c.data(config=p["data"], env=env, input_limits=p["validate"],
                                 **_given(corpus=imported.get("corpus"))), "data", caching).outputs["data"]
    human_prefs = imported.get("human_prefs")
    validate = _configure(c.validate(config=p["validate"], env=env, corpus=data, **_given(prefs=human_prefs)),
                          "validate", caching)
    pretrain = _configure(c.pretrain(config=p["pretrain"], env=env, launcher=launcher(gpus["pretrain"]), data=data),
                          "pretrain", caching, gpus["pretrain"]).after(validate)
    policy = pretrain.outputs["policy"]
    label = _configure(c.label(config=p["label"], env=env, input_limits=p["validate"], data=data, policy=policy,
                               **_given(judge_model=imported.get("judge_model"), human_prefs=human_prefs)),
                       "label", caching)
    prefs = label.outputs["prefs"]
    reward = _configure(c.reward(config=p["reward"], env=env, input_limits=p["validate"],
                                 launcher=launcher(gpus["reward"]), prefs=prefs, policy=policy),
                        "reward", caching, gpus["reward"])
    dpo = _configure(c.dpo(config=p["dpo"], env=env, input_limits=p["validate"], launcher=launcher(gpus["dpo"]),
                           data=data, policy=policy, prefs=prefs, **_given(human_prefs=human_prefs)),
                     "dpo", caching, gpus["dpo"])
    grpo = _configure(c.grpo(config=p["grpo"], env=env, data=data, policy=policy,
                             reward_model=reward.outputs["reward_model"]), "grpo", caching)
    tail = dict(data=data, policy=policy, dpo=dpo.outputs["dpo"], grpo=grpo.outputs["grpo"],
                reward_model=reward.outputs["reward_model"],
                evaluate=p["evaluate"], export=p["export"], register=p["register"], **run_info)
    release_with_ppo, release = releases
    with dsl.If(p["run_ppo"] == True, name="ppo-on"):  # noqa: E712 (a KFP condition, compiled, not evaluated)
        ppo = _configure(c.ppo(config=p["ppo"], env=env, data=data, policy=policy,
                               reward_model=reward.outputs["reward_model"]), "ppo", caching)
        release_with_ppo(ppo=ppo.outputs["ppo"], **tail).set_display_name("evaluate-export-register")
    with dsl.Else(name="ppo-off"):
        release(**tail).set_display_name("evaluate-export-register")


def build_pipeline(stage_params: dict[str, dict], gpus: dict[str, int] | None = None,
                   imports: dict[str, str] | None = None, run_ppo: bool = True, mlflow_tracking_uri: str = "",
                   git_commit: str = "", data_version: str = "", caching: bool = True):
    """The pipeline function, its parameters' defaults taken from here (KFP reads them when compiling):

    `stage_params`: stage -> its params.yaml section (one dict parameter per stage); `gpus`: GPUs for pretrain,
    reward, dpo (default 1); `imports`: artifact name (see IMPORTS) -> URI to import instead of building it;
    `caching=False` turns the KFP cache off for every task (recurring runs), else it is off only for NO_CACHE.
    """
    gpus = {stage: int((gpus or {}).get(stage, 1)) for stage in MULTI_GPU}
    imports = dict(imports or {})
    if set(imports) - set(IMPORTS):
        raise ValueError(f"cannot import {sorted(set(imports) - set(IMPORTS))}; importable: {', '.join(IMPORTS)}")
    if "data" in imports and "corpus" in imports:
        raise ValueError("import either data (a built data/) or corpus (to build data/ from), not both")
    stages = [s for s in STAGES if not (s == "data" and "data" in imports)]
    params = [
        *[(s, dict, dict(stage_params.get(s, {})), f"the `{s}` section of params.yaml") for s in stages],
        ("run_ppo", bool, run_ppo, "run the PPO stage and offer its policy as a candidate"),
        ("mlflow_tracking_uri", str, mlflow_tracking_uri,
         f"MLflow tracking URI (empty: MLFLOW_TRACKING_URI from the `{MLFLOW_SECRET}` secret)"),
        ("git_commit", str, git_commit, "commit of the code, tagged on every MLflow run"),
        ("data_version", str, data_version, "version of the data (e.g. its DVC md5), tagged on every MLflow run"),
        *[(f"{name}_uri", str, uri, f"URI of the {name} artifact to import") for name, uri in imports.items()],
    ]
    signature = inspect.Signature([inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                     default=default, annotation=tp)
                                   for name, tp, default, _ in params])

    releases = _release_pipelines(caching)  # built first: KFP does not define a pipeline inside another's body

    def alignpipe(*args, **kwargs):
        _wire(signature.bind(*args, **kwargs).arguments, gpus, tuple(imports), caching, releases)

    alignpipe.__signature__ = signature
    alignpipe.__doc__ = "Align a language model with preferences.\n\nArgs:\n" + "".join(
        f"    {name}: {help}\n" for name, _, _, help in params)
    return dsl.pipeline(name=PIPELINE_NAME, description=__doc__.splitlines()[0])(alignpipe)
