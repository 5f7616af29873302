"""The Kubeflow run form: each pipeline parameter has a one-line description (a stage's names its params.yaml
section), and every int field of a stage's dict parameter is an int in the compiled YAML (protobuf Structs hold
doubles, the compiler would write `n_prompts: 1024.0`); floats stay floats."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from alignpipe.cli.main import main
from alignpipe.stages import load_stage
from alignpipe.components.stages import COMPONENTS

ROOT = Path(__file__).resolve().parents[1]


def test_compiled_parameters_have_descriptions_and_integer_defaults(tmp_path):
    out = tmp_path / "pipeline.yaml"
    assert main(["pipeline", "compile", "--out", str(out), "--params", str(ROOT / "params.yaml")]) == 0
    text = out.read_text()
    spec = next(yaml.safe_load_all(text))
    params = spec["root"]["inputDefinitions"]["parameters"]
    for name, param in params.items():
        assert param["description"].strip() and "\n" not in param["description"], name
    n_ints = 0
    for stage in COMPONENTS:
        assert f"the `{stage}` section of params.yaml" in params[stage]["description"]
        default = params[stage]["defaultValue"]
        hints = typing.get_type_hints(load_stage(stage).Config)
        for f in dataclasses.fields(load_stage(stage).Config):
            if hints[f.name] is int:
                assert type(default[f.name]) is int, f"{stage}.{f.name}: {default[f.name]!r}"
                n_ints += 1
            elif hints[f.name] is float:
                assert type(default[f.name]) is float, f"{stage}.{f.name}: {default[f.name]!r}"
    assert n_ints > 50
    assert params["data"]["defaultValue"]["n_prompts"] == 1024  # params.yaml's value
    assert "'n_prompts': 1024," in text and "1024.0" not in text  # the header comment KFP writes, too
    assert spec["pipelineInfo"]["name"] == "alignpipe" and "deploymentSpec" in spec  # the rest is KFP's own
