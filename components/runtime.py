"""What every alignpipe KFP component does inside its container, so the component bodies stay a few lines.

A component hands over its stage name, its config dict (a params.yaml section), its KFP input artifacts and its
main output artifact; `run_stage` sets the environment, builds the stage's frozen Config and calls the same
`alignpipe.run.runner.execute` as the CLI and DVC, then copies the metrics into the `Output[Metrics]` artifact.
With a `launcher` (e.g. `torchrun --nproc_per_node 4 -m alignpipe`, set by the pipeline when a stage asks for
several GPUs) the stage runs as `<launcher> <stage> --params ... --<input> ... --out ...` instead: the CLI path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml


def run_stage(stage: str, config: dict, inputs: dict[str, Any], out: Any, metrics: Any, env: dict,
              launcher: list | None = None, input_limits: dict | None = None,
              extra_outputs: dict[str, tuple[Any, str]] | None = None) -> dict[str, float]:
    """Run `stage` on the KFP artifacts `inputs` (name -> artifact or None) into `out.path`; log its metrics.
    `input_limits`: the `validate` params section, for the stages that validate their input files;
    `extra_outputs`: name -> (output artifact, the file or folder of the stage's output copied to it)."""
    for key, value in env.items():
        if value:  # an empty pipeline parameter keeps what the pod already has (e.g. from the MLflow secret)
            os.environ[key] = str(value)
    from alignpipe.stages import load_stage

    cfg_cls = load_stage(stage).Config
    paths = {name: (artifact.path if artifact is not None else None) for name, artifact in inputs.items()}
    if launcher:
        result = launch(list(launcher), stage, config, paths, out.path, input_limits)
    else:
        from alignpipe.run.runner import execute, input_limits as limits_of

        result = execute(stage, cfg_cls.from_dict(config), paths, out.path, limits_of({"validate": input_limits or {}}))
    for key, value in result.items():
        metrics.log_metric(key, value)
    for artifact, relative in (extra_outputs or {}).values():
        copy_output(Path(out.path) / relative, artifact.path)
    return result


def cli_command(launcher: list[str], stage: str, params_file: str, paths: dict[str, str | None],
                out_dir: str) -> list[str]:
    """`<launcher> <stage> --params F --<input> PATH ... --out DIR`; a missing optional input is passed as ""
    so the CLI does not fall back to its default path (e.g. `data`)."""
    command = [*launcher, *(["data", "build"] if stage == "data" else [stage]), "--params", params_file]
    for name, path in paths.items():
        command += [f"--{name.replace('_', '-')}", path or ""]
    return [*command, "--out", out_dir]


def launch(launcher: list[str], stage: str, config: dict, paths: dict[str, str | None],
           out_dir: str, input_limits: dict | None = None) -> dict[str, float]:
    """Run the stage through the CLI under `launcher` (torchrun for multi-GPU); returns its metrics.json."""
    with tempfile.TemporaryDirectory() as tmp:
        params_file = Path(tmp) / "params.yaml"
        params_file.write_text(yaml.safe_dump({stage: config, "validate": dict(input_limits or {})}),
                               encoding="utf-8")
        subprocess.run(cli_command(launcher, stage, str(params_file), paths, out_dir), check=True)
    return json.loads((Path(out_dir) / "metrics.json").read_text(encoding="utf-8"))


def copy_output(src: str | Path, dst: str | Path) -> None:
    """Copy a file (HTML, Markdown the UI renders) or a folder (evaluate's best/) of a stage's output to a KFP
    output artifact."""
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    if Path(src).is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        shutil.copyfile(src, dst)
