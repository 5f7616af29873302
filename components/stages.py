"""One KFP v2 lightweight component per stage, generated from the stage registry (`alignpipe.stages`): the same
`run(cfg, inputs, out_dir)` as the CLI and DVC.

Each component's signature is its stage's: one typed parameter per key of its params.yaml section
(`<stage>__<key>`, a group's key `<stage>__<group>__<key>`, e.g. `evaluate__sampling__temperature`: int, float,
bool, str or list, so KFP keeps ints as ints; a dict parameter would be a protobuf Struct, whose numbers are all
doubles), `env` (MLflow URI, git commit, data version; empty values are skipped),
`launcher` for the stages that scale to several GPUs ([] = in process, else e.g. torchrun), the `validate__<key>`
parameters (the input limits) for the stages that validate input files,
one input artifact per entry of the stage module's INPUTS (optional where the stage can do without it), its main
output (named as the stages downstream call it: `alignpipe.stages.OUTPUTS`), `metrics`, and the EXTRA_OUTPUTS.
Its body, serialized into the compiled YAML and run in the pinned image (components/image.py), imports inside the
function, as KFP requires, and hands over to `alignpipe.components.runtime.run_stage`. Resources, GPUs and caching
are set in pipelines/, not here.
"""

import json
import linecache
import typing

from kfp import dsl

from alignpipe.components.image import CPU_IMAGE, GPU_IMAGE
from alignpipe.core.config import config_keys
from alignpipe.reports.candidates import BEST_DIR
from alignpipe.stages import MULTI_GPU, OUTPUTS, STAGE_HELP, load_stage

CPU_STAGES = ("data", "validate", "register")  # the CPU image; every other stage runs on the GPU image
# The KFP artifact class of an input or output, by name; every other one (policies, reward model, export) is a Model.
ARTIFACT_TYPES = {"data": "Dataset", "corpus": "Dataset", "prefs": "Dataset", "human_prefs": "Dataset",
                  "prompts": "Dataset", "validation": "Artifact", "evaluation": "Artifact", "registry": "Artifact"}
# Outputs beside a stage's main one: name -> (KFP artifact class, the file or folder of the stage's output it is).
EXTRA_OUTPUTS = {
    "validate": {"report_html": ("HTML", "report.html")},  # the results page (the GX site stays in `validation`)
    "evaluate": {"best": ("Model", BEST_DIR), "report": ("Markdown", "report.md"), "report_html": ("HTML", "report.html")},
}


SEP = "__"  # a config parameter's name: <stage>__<key>, <stage>__<group>__<key> (names hold no double underscore)


def _kfp_type(tp) -> type:
    """The KFP parameter type of a Config field's annotation: int, float, bool, str (a Literal too) or list."""
    if typing.get_origin(tp) is typing.Literal:
        kinds = {type(a) for a in typing.get_args(tp)}
        if kinds == {str}:
            return str
    elif typing.get_origin(tp) is list:
        return list
    elif tp in (int, float, bool, str):
        return tp
    raise TypeError(f"no KFP parameter type for the config annotation {tp!r}")


def config_parameters(stage: str) -> list[tuple[str, str, type]]:
    """(parameter name, config key, KFP type) for each key of `stage`'s Config in field order (a group's keys as
    `group.key`, named `<stage>__<group>__<key>`)."""
    return [(f"{stage}{SEP}{key.replace('.', SEP)}", key, _kfp_type(tp))
            for key, _, tp, _ in config_keys(load_stage(stage).Config)]


def _config_literal(params: list[tuple[str, str, type]]) -> str:
    """The source of the config dict a component hands its stage: `{"key": <param>, "group": {"key": <param>}}`."""
    q = json.dumps
    nested: dict = {}
    for name, key, _ in params:
        *groups, last = key.split(".")
        inner = nested
        for g in groups:
            inner = inner.setdefault(g, {})
        inner[last] = name

    def literal(d: dict) -> str:
        return "{" + ", ".join(f"{q(k)}: {literal(v) if isinstance(v, dict) else v}" for k, v in d.items()) + "}"

    return literal(nested)


def uses_limits(stage: str) -> bool:
    """Whether `stage` validates input files with the `validate` section's limits (its validate__ parameters)."""
    return bool(getattr(load_stage(stage), "CHECKED_INPUTS", None))


def component_source(stage: str) -> str:
    """The Python source of `stage`'s component function."""
    q = json.dumps  # a double-quoted string literal
    module = load_stage(stage)
    output = OUTPUTS[stage]
    own = config_parameters(stage)
    params = [f"{name}: {tp.__name__}" for name, _, tp in own] + ["env: dict"]
    lines = ["    config = " + _config_literal(own)]
    call = {}
    if stage in MULTI_GPU:
        params.append("launcher: list")
        call["launcher"] = "launcher"
    if uses_limits(stage):
        limits = config_parameters("validate") if stage != "validate" else own
        if stage != "validate":
            params += [f"{name}: {tp.__name__}" for name, _, tp in limits]
        lines.append("    input_limits = " + _config_literal(limits))
        call["input_limits"] = "input_limits"
    params += [f"{i.name}: Input[{ARTIFACT_TYPES.get(i.name, 'Model')}]" for i in module.INPUTS if i.required]
    params += [f"{output}: Output[{ARTIFACT_TYPES.get(output, 'Model')}]", "metrics: Output[Metrics]"]
    extra = EXTRA_OUTPUTS.get(stage, {})
    params += [f"{name}: Output[{kind}]" for name, (kind, _) in extra.items()]
    params += [f"{i.name}: Input[{ARTIFACT_TYPES.get(i.name, 'Model')}] = None" for i in module.INPUTS
               if not i.required]
    if extra:
        call["extra_outputs"] = "{" + ", ".join(f"{q(n)}: ({n}, {q(path)})" for n, (_, path) in extra.items()) + "}"
    inputs = "{" + ", ".join(f"{q(i.name)}: {i.name}" for i in module.INPUTS) + "}"
    args = ", ".join([q(stage), "config", inputs, output, "metrics", "env", *(f"{k}={v}" for k, v in call.items())])
    return (f"def {stage}({', '.join(params)}):\n"
            f"    {q(STAGE_HELP[stage].split(' (')[0])}\n"
            f"    from alignpipe.components.runtime import run_stage\n\n"
            + "".join(line + "\n" for line in lines) +
            f"    run_stage({args})\n")


def make_component(stage: str):
    """`stage`'s component: its generated source, compiled (and put in linecache, where KFP reads it back)."""
    from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

    source = component_source(stage)
    filename = f"<alignpipe component {stage}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"__name__": __name__, "Input": Input, "Output": Output, "Artifact": Artifact, "Dataset": Dataset,
                 "HTML": HTML, "Markdown": Markdown, "Metrics": Metrics, "Model": Model}
    exec(compile(source, filename, "exec"), namespace)
    image = CPU_IMAGE if stage in CPU_STAGES else GPU_IMAGE
    # install_kfp_package=False: the image already has the pinned kfp, so pods start without pip (and offline).
    return dsl.component(base_image=image, install_kfp_package=False)(namespace[stage])


# Stage name -> component, in DAG order (the names of params.yaml sections, CLI commands and DVC stages).
COMPONENTS = {name: make_component(name) for name in OUTPUTS}
