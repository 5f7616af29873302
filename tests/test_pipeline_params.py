"""The Kubeflow run form: one typed parameter per key of every stage's params.yaml section (`<stage>__<key>`),
each with a one-line description; int fields are NUMBER_INTEGER (a dict parameter would be a protobuf Struct, whose
numbers are all doubles, and the component would get `n_prompts: 1024.0`), floats NUMBER_DOUBLE. KFP writes every
default as a protobuf Value (`1024.0` in the YAML); the parameter type makes the backend and kfp.local hand the
component an int, which it passes to its Config as it is (no int restoring)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from alignpipe.cli.main import main
from alignpipe.core.config import build_config, load_params
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
        cls = load_stage(stage).Config
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            param = params[f"{stage}__{f.name}"]
            assert param["description"].startswith(f"{stage}.{f.name} (params.yaml): ")
            default = param.get("defaultValue", "")  # KFP leaves out a default of ""
            if hints[f.name] in KFP_TYPES:
                assert param["parameterType"] == KFP_TYPES[hints[f.name]], f"{stage}.{f.name}"
                assert default == getattr(expected[stage], f.name), f"{stage}.{f.name}: {default!r}"
                n_ints += hints[f.name] is int
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
