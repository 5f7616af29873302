"""One KFP v2 lightweight component per stage, generated from the stage registry (`alignpipe.stages`): the same
`run(cfg, inputs, out_dir)` as the CLI and DVC.

Each component's signature is its stage's: `config` (the stage's params.yaml section), `env` (MLflow URI, git
commit, data version; empty values are skipped), `launcher` for the stages that scale to several GPUs ([] = in
process, else e.g. torchrun), `input_limits` (the `validate` section) for the stages that validate input files,
one input artifact per entry of the stage module's INPUTS (optional where the stage can do without it), its main
output (named as the stages downstream call it: `alignpipe.stages.OUTPUTS`), `metrics`, and the EXTRA_OUTPUTS.
Its body, serialized into the compiled YAML and run in the pinned image (components/image.py), imports inside the
function, as KFP requires, and hands over to `alignpipe.components.runtime.run_stage`. Resources, GPUs and caching
are set in pipelines/, not here.
"""

import json
import linecache

from kfp import dsl

from alignpipe.components.image import CPU_IMAGE, GPU_IMAGE
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


def component_source(stage: str) -> str:
    """The Python source of `stage`'s component function."""
    q = json.dumps  # a double-quoted string literal
    module = load_stage(stage)
    output = OUTPUTS[stage]
    params = ["config: dict", "env: dict"]
    call = {}
    if stage in MULTI_GPU:
        params.append("launcher: list")
        call["launcher"] = "launcher"
    if getattr(module, "CHECKED_INPUTS", None):
        params.append("input_limits: dict")
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
