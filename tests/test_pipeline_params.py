"""The Kubeflow run form: one typed parameter per key of every stage's params.yaml section (`<stage>__<key>`),
each with a one-line description; int fields are NUMBER_INTEGER (a dict parameter would be a protobuf Struct, whose
numbers are all doubles, and the component would get `n_prompts: 1024.0`), floats NUMBER_DOUBLE. KFP writes every
default as a protobuf Value (`1024.0` in the YAML); the parameter type makes the backend and kfp.local hand the
component an int, which it passes to its Config as it is (no int restoring)."""

from __future__ import annotations

from pathlib import Path

import yaml

from alignpipe.cli.main import main
from alignpipe.core.config import build_config, config_keys, flatten, load_params
from alignpipe.stages import load_stage
from alignpipe.components.stages import COMPONENTS

ROOT = Path(__file__).resolve().parents[1]
KFP_TYPES = {int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", bool: "BOOLEAN", str: "STRING"}


def test_compiled_parameters_are_typed_with_descriptions_and_defaults(tmp_path):
    out = tmp_path / "pipeline.yaml"
    assert main(["pipeline", "compile", "--out", str(out), "--params", str(ROOT / "params.yaml")]) == 0
    text = out.read_text()
    spec = next(yaml.safe_load_all(text))
    params = spec["root"]["inputDefinitions"]["parameters"]
    for name, param in params.items():
        assert param["description"].strip() and "\n" not in param["description"], name
    repo = load_params(ROOT / "params.yaml")
    expected = {stage: build_config(load_stage(stage).Config, repo) for stage in COMPONENTS}
    n_ints = 0
    for stage in COMPONENTS:
        for key, _, tp, _ in config_keys(load_stage(stage).Config):  # a group's keys as group.key
            param = params[f"{stage}__{key.replace('.', '__')}"]
            assert param["description"].startswith(f"{stage}.{key} (params.yaml): ")
            default = param.get("defaultValue", "")  # KFP leaves out a default of ""
            if tp in KFP_TYPES:
                assert param["parameterType"] == KFP_TYPES[tp], f"{stage}.{key}"
                assert default == flatten(expected[stage].to_dict())[key], f"{stage}.{key}: {default!r}"
                n_ints += tp is int
    assert n_ints > 50
    assert params["data__n_prompts"]["defaultValue"] == 1024  # params.yaml's value
    assert params["pretrain__max_steps"]["defaultValue"] == 450
    for name, executor in spec["deploymentSpec"]["executors"].items():  # no int restoring left in a component
        assert "restore_ints" not in " ".join(executor["container"]["command"]), name
    assert spec["pipelineInfo"]["name"] == "alignpipe" and "deploymentSpec" in spec  # the rest is KFP's own
    components = spec["components"]
    label_inputs = components["comp-label"]["inputDefinitions"]["parameters"]
    assert label_inputs["label__k"]["parameterType"] == "NUMBER_INTEGER"
    assert label_inputs["validate__min_rows"]["parameterType"] == "NUMBER_INTEGER"


def test_a_nested_key_is_one_typed_parameter_and_reaches_its_stage_typed(tmp_path):
    """A group's key (`evaluate.sampling.max_new_tokens`) is its own typed parameter
    (`evaluate__sampling__max_new_tokens`, NUMBER_INTEGER); the component nests it back, and its stage's Config
    gets an int as an int and a float as a float."""
    from alignpipe.components.stages import component_source
    from alignpipe.stages import evaluate

    out = tmp_path / "pipeline.yaml"
    assert main(["pipeline", "compile", "--out", str(out), "--params", str(ROOT / "configs" / "arith.yaml"),
                 "--set", "evaluate.sampling.temperature=0.5"]) == 0
    spec = next(yaml.safe_load_all(out.read_text()))
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["evaluate__sampling__max_new_tokens"]["parameterType"] == "NUMBER_INTEGER"
    assert params["evaluate__sampling__max_new_tokens"]["defaultValue"] == 12  # configs/arith.yaml
    assert params["evaluate__sampling__temperature"]["parameterType"] == "NUMBER_DOUBLE"
    assert params["evaluate__sampling__temperature"]["defaultValue"] == 0.5  # --set
    assert params["ppo__sampling__top_p"]["defaultValue"] == 1.0  # ppo's own default
    assert "evaluate__sampling" not in params and "evaluate__temperature" not in params
    # the component's config, from its parameters as KFP hands them over: typed (the YAML writes 12.0, the
    # backend and kfp.local pass a NUMBER_INTEGER as an int)
    literal = next(line for line in component_source("evaluate").splitlines() if line.strip().startswith("config = "))
    typed = {"NUMBER_INTEGER": int, "NUMBER_DOUBLE": float, "BOOLEAN": bool, "STRING": str, "LIST": list}
    given = {name: typed[p["parameterType"]](p.get("defaultValue", typed[p["parameterType"]]()))
             for name, p in params.items() if name.startswith("evaluate__")}
    cfg = evaluate.Config.from_dict(eval(literal.split("=", 1)[1], {}, given))
    assert cfg.sampling.max_new_tokens == 12 and type(cfg.sampling.max_new_tokens) is int
    assert cfg.sampling.temperature == 0.5 and cfg.n_prompts == 200 and type(cfg.n_prompts) is int
