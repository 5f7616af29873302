"""The Kubeflow DAG: data -> validate -> pretrain -> label -> reward -> the other candidates -> evaluate -> export ->
register, generated from the stage registry (`alignpipe.stages`).

Wiring only: which output feeds which input, per-task CPU/memory/GPU, node selectors and tolerations, caching,
the MLflow secret. The stage logic is in alignpipe.stages, the components in components/.

- Data: the first task builds it (`data` stage, from the image's stdlib or an imported `corpus`), unless the
  pipeline was compiled with `imports={"data": URI}`: then a `dsl.importer` brings in an existing data/ and its URI
  is the `data_uri` run parameter (a recurring run re-imports it on every run). Likewise `human_prefs` (checked by
  validate, used by label and the preference trainers) and `judge_model` (label's judge) are imported only when
  given at compile time. evaluate's optional `prompts` input is not wired (evaluate reads data's prompts.jsonl).
- Candidates: every policy-producing stage of the registry after pretrain gets each of its inputs from the artifact
  of that name (data, policy, prefs, reward_model, an imported human_prefs); evaluate takes them all and hands its
  `best` output alone to export and register.
- A candidate stage registered with `switch` is optional at run time: its `run_<stage>` parameter picks one of two
  branches, with and without it, each running the same evaluate -> export -> register sub-pipeline (one definition,
  built per set of candidates: KFP's local runner cannot merge artifacts from two branches, `dsl.OneOf`).
- GPUs: the training, sampling and export tasks request `nvidia.com/gpu` and land on GPU nodes; data, validate
  and register run on the CPU image. `gpus[stage]` (the multi-GPU stages; default 1) is the GPU request: above 1
  the stage starts under torchrun, one process per GPU; 0 runs it on a CPU node.
"""

import inspect
import itertools

from kfp import dsl, kubernetes
from kfp.dsl import Dataset, Input, Model

from alignpipe.components import stages as c
from alignpipe.components.stages import CPU_STAGES
from alignpipe.core.config import config_keys, flatten
from alignpipe.stages import CANDIDATES, MULTI_GPU, SWITCHED, load_stage

PIPELINE_NAME = "alignpipe"
STAGES = tuple(c.COMPONENTS)  # data, then the registry's stages in DAG order
TRAINERS = tuple(stage for stage, _ in CANDIDATES[1:])  # the candidates after the reference (pretrain)

# (CPU cores, memory GiB) per task; GPU tasks get this per GPU. A candidate stage not listed gets TRAINING.
TRAINING = (8, 32)
RESOURCES = {"data": (2, 8), "validate": (2, 8), "label": (4, 32), "reward": (4, 32), "evaluate": (4, 32),
             "export": (4, 32), "register": (2, 8), **{stage: TRAINING for stage, _ in CANDIDATES}}
GPU_STAGES = tuple(s for s in STAGES if s not in CPU_STAGES)
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_LABEL = ("nvidia.com/gpu.present", "true")  # set on GPU nodes by NVIDIA GPU feature discovery
# Never served from the KFP cache: the stages whose outputs or metrics are sampled from the policy (label, every
# candidate, evaluate), and register, whose point is its side effect (a new registry version).
NO_CACHE = ("label", *(stage for stage, _ in CANDIDATES), "evaluate", "register")
# Kubernetes secret with the MLflow address and credentials, mounted as env on every task (optional: a cluster
# without it falls back to the `mlflow_tracking_uri` parameter). Each key is the env variable of the same name.
MLFLOW_SECRET = "alignpipe-mlflow"
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                      "MLFLOW_TRACKING_TOKEN", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# Artifacts a pipeline can import instead of producing (compile-time choice; the URI is a run parameter).
IMPORTS = {"data": Dataset, "corpus": Dataset, "human_prefs": Dataset, "judge_model": Model}
RUN_INFO = ("mlflow_tracking_uri", "git_commit", "data_version")
RELEASE = ("evaluate", "export", "register")  # the stages of the release sub-pipeline


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


def _config(p: dict, stage: str) -> dict:
    """The typed config parameters of `stage`'s component (`<stage>__<key>`), and the `validate__<key>` input
    limits of a stage that validates input files, from the pipeline's parameters `p`."""
    names = [name for name, _, _ in c.config_parameters(stage)]
    if stage != "validate" and c.uses_limits(stage):
        names += [name for name, _, _ in c.config_parameters("validate")]
    return {name: p[name] for name in names}


def _given(**artifacts) -> dict:
    """Only the optional inputs that exist (a component's optional input is left out, not passed None)."""
    return {k: v for k, v in artifacts.items() if v is not None}


def _env(mlflow_tracking_uri, git_commit, data_version) -> dict:
    """The `env` parameter of every component (built where the tasks are: KFP's local runner does not resolve a
    dict of pipeline channels handed to a sub-pipeline)."""
    return {"MLFLOW_TRACKING_URI": mlflow_tracking_uri, "ALIGNPIPE_GIT_COMMIT": git_commit,
            "ALIGNPIPE_DATA_VERSION": data_version}


def _release_pipelines(caching: bool) -> dict[tuple[str, ...], object]:
    """The evaluate -> export -> register sub-pipeline, one per set of switched candidates that run (a tuple of
    their stage names): inputs data, reward_model and one policy per candidate present."""

    def release(present: tuple[str, ...]):
        outputs = [output for stage, output in CANDIDATES if stage not in SWITCHED or stage in present]

        def tail(*args, **kwargs):
            p = tail.__signature__.bind(*args, **kwargs).arguments
            env = _env(**{k: p[k] for k in RUN_INFO})
            policies = {output: p[output] for output in outputs}
            ev = _configure(c.COMPONENTS["evaluate"](**_config(p, "evaluate"), env=env, data=p["data"],
                                                     reward_model=p["reward_model"], **policies), "evaluate", caching)
            best = ev.outputs["best"]
            ex = _configure(c.COMPONENTS["export"](**_config(p, "export"), env=env, best=best, data=p["data"],
                                                   reward_model=p["reward_model"]), "export", caching)
            _configure(c.COMPONENTS["register"](**_config(p, "register"), env=env, best=best,
                                                export=ex.outputs["export"], reward_model=p["reward_model"]),
                       "register", caching)

        artifacts = [("data", Input[Dataset]), ("reward_model", Input[Model]), *((o, Input[Model]) for o in outputs)]
        params = [*((name, tp) for s in RELEASE for name, _, tp in c.config_parameters(s)),
                  *((k, str) for k in RUN_INFO)]
        tail.__signature__ = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=t)
                                                for n, t in [*artifacts, *params]])
        tail.__name__ = "release" + "".join(f"_with_{s}" for s in present)
        names = ", ".join(s for s, _ in CANDIDATES if s not in SWITCHED or s in present)
        return dsl.pipeline(name=tail.__name__.replace("_", "-"),
                            description=f"evaluate, export, register; candidates {names}")(tail)

    subsets = itertools.product(*[[(s,), ()] for s in SWITCHED])
    return {present: release(present) for present in (sum(subset, ()) for subset in subsets)}


def _trainer(stage: str, p: dict, env: dict, artifacts: dict, gpus: dict[str, int], caching: bool):
    """A candidate stage's task: each of its inputs from the artifact of that name (left out when absent)."""
    component = c.COMPONENTS[stage]
    spec = component.component_spec.inputs
    kwargs = {name: artifacts[name] for name in spec if name in artifacts}
    missing = [name for name, s in spec.items() if name not in kwargs and not s.optional
               and name not in ("env", "launcher") and c.SEP not in name]
    if missing:
        raise ValueError(f"{stage}: no artifact in the DAG for its input(s) {', '.join(missing)}")
    if "launcher" in spec:
        kwargs["launcher"] = launcher(gpus[stage])
    return _configure(component(**_config(p, stage), env=env, **kwargs), stage, caching, gpus.get(stage, 1))


def _branches(p: dict, switched: tuple[str, ...], present: tuple[str, ...], tail: dict, artifacts: dict,
              gpus: dict[str, int], caching: bool, releases: dict) -> None:
    """One dsl.If/Else per switched candidate (`run_<stage>`), the release sub-pipeline in every leaf."""
    if not switched:
        releases[present](**tail).set_display_name("evaluate-export-register")
        return
    stage, rest = switched[0], switched[1:]
    with dsl.If(p[f"run_{stage}"] == True, name=f"{stage}-on"):  # noqa: E712 (a KFP condition, compiled)
        task = _trainer(stage, p, _env(**{k: p[k] for k in RUN_INFO}), artifacts, gpus, caching)
        output = dict(CANDIDATES)[stage]
        _branches(p, rest, (*present, stage), {**tail, output: task.outputs[output]}, artifacts, gpus, caching,
                  releases)
    with dsl.Else(name=f"{stage}-off"):
        _branches(p, rest, present, tail, artifacts, gpus, caching, releases)


def _wire(p: dict, gpus: dict[str, int], imports: tuple[str, ...], caching: bool, releases: dict) -> None:
    run_info = {k: p[k] for k in RUN_INFO}
    env = _env(**run_info)
    imported = {}
    for name in imports:
        task = dsl.importer(artifact_uri=p[f"{name}_uri"], artifact_class=IMPORTS[name], reimport=True)
        imported[name] = task.set_display_name(f"import-{name}").set_caching_options(caching).output
    components = c.COMPONENTS
    if "data" in imported:
        data = imported["data"]
    else:
        data = _configure(components["data"](**_config(p, "data"), env=env, **_given(corpus=imported.get("corpus"))),
                          "data", caching).outputs["data"]
    human_prefs = imported.get("human_prefs")
    validate = _configure(components["validate"](**_config(p, "validate"), env=env, corpus=data,
                                                 **_given(prefs=human_prefs)), "validate", caching)
    pretrain = _configure(components["pretrain"](**_config(p, "pretrain"), env=env, launcher=launcher(gpus["pretrain"]),
                                                 data=data), "pretrain", caching, gpus["pretrain"]).after(validate)
    policy = pretrain.outputs["policy"]
    label = _configure(components["label"](**_config(p, "label"), env=env, data=data,
                                           policy=policy, **_given(judge_model=imported.get("judge_model"),
                                                                   human_prefs=human_prefs)), "label", caching)
    prefs = label.outputs["prefs"]
    reward = _configure(components["reward"](**_config(p, "reward"), env=env, launcher=launcher(gpus["reward"]),
                                             prefs=prefs, policy=policy),
                        "reward", caching, gpus["reward"])
    reward_model = reward.outputs["reward_model"]
    artifacts = {"data": data, "policy": policy, "prefs": prefs, "reward_model": reward_model,
                 **_given(human_prefs=human_prefs)}
    tail = dict(data=data, reward_model=reward_model, policy=policy, **run_info,
                **{name: p[name] for s in RELEASE for name, _, _ in c.config_parameters(s)})
    for stage in TRAINERS:
        if stage not in SWITCHED:
            output = dict(CANDIDATES)[stage]
            tail[output] = _trainer(stage, p, env, artifacts, gpus, caching).outputs[output]
    _branches(p, SWITCHED, (), tail, artifacts, gpus, caching, releases)


def _key(stage: str, key: str) -> tuple:
    """(key, field, annotation, default) of `stage.key` (`group.key` for a group's key)."""
    return next(k for k in config_keys(load_stage(stage).Config) if k[0] == key)


def _default(stage: str, key: str):
    """The Config default of `stage.key` (a stage section given without it)."""
    return _key(stage, key)[3]


def _help(stage: str, key: str) -> str:
    return " ".join(_key(stage, key)[1].metadata.get("help", "").split())


def build_pipeline(stage_params: dict[str, dict], gpus: dict[str, int] | None = None,
                   imports: dict[str, str] | None = None, run: dict[str, bool] | None = None,
                   mlflow_tracking_uri: str = "", git_commit: str = "", data_version: str = "", caching: bool = True):
    """The pipeline function, its parameters' defaults taken from here (KFP reads them when compiling):

    `stage_params`: stage -> its params.yaml section (one typed parameter `<stage>__<key>` per key, its default
    the section's value, else the Config's); `gpus`: GPUs for the
    MULTI_GPU stages (default 1); `imports`: artifact name (see IMPORTS) -> URI to import instead of building it;
    `run`: a SWITCHED stage -> the default of its `run_<stage>` parameter (default true);
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
        *[(name, tp, flatten(stage_params.get(s) or {}).get(key, _default(s, key)),
           f"{s}.{key} (params.yaml): {_help(s, key)}") for s in stages for name, key, tp in c.config_parameters(s)],
        *[(f"run_{stage}", bool, bool((run or {}).get(stage, True)),
           f"run the {stage} stage and offer its policy as a candidate") for stage in SWITCHED],
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
