"""Run one stage: check its inputs, open its MLflow run, call `run`, write its metrics, publish atomically.

Beside the stage's outputs it writes metrics.json (all metrics), metrics_headline.json (the stage module's
HEADLINE, for `dvc metrics show`) and curves/<metric>.tsv (every per-step metric logged through `tracking.runs`, for
`dvc plots show`; absent when the stage logged none) and, for a stage with CHECKED_INPUTS, input_validation.json:
its input files checked, before any work, by the validate stage's validators with the `validate` section's limits.
A stage with CHECKED_OUTPUTS has the files it wrote checked the same way before they are published.

The CLI, the DVC commands and the KFP components all go through `execute`, so a stage behaves the same way
everywhere. Outputs are written to a hidden staging folder beside `out_dir` and moved into place only when the
stage succeeded: a failed stage leaves nothing half-written (only the report.html/json saying why, moved to
`<out_dir>.failed/`). Under torchrun every rank runs the stage (its collectives need them all); only rank 0
opens the MLflow run, writes metrics.json and publishes `out_dir`. Every stage runs under `core.determinism.pin()`
(a fixed torch thread count, deterministic kernels): the same inputs and params give the same output bytes on one
machine (docs/reproducibility.md).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from alignpipe.core import determinism, distributed
from alignpipe.core.config import StageConfig
from alignpipe.core.errors import ConfigError, DataError
from alignpipe.core.io import clean_metrics, headline, write_curves, write_json
from alignpipe.core.locks import hold
from alignpipe.core.outputs import MARKER, check_output_dir, is_ours, make_output_dir, remove_ours
from alignpipe.data.validators import Limits, check_inputs, output_files, validate_files
from alignpipe.stages import load_stage
from alignpipe.tracking import runs

METRICS_FILE = "metrics.json"  # every metric: the contract other stages, KFP and MLflow read (docs/METRICS.md)
HEADLINE_FILE = "metrics_headline.json"  # the stage's HEADLINE metrics: what `dvc metrics show` lists
INPUT_CHECKS_FILE = "input_validation.json"  # the validators' report on the stage's CHECKED_INPUTS
CURVES_DIR = "curves"  # <metric>.tsv for every per-step metric the stage logged (runs.log_metrics with a step)


def resolve_inputs(name: str, given: dict[str, Any]) -> dict[str, Path | None]:
    """Fill defaults for missing required inputs and check that they exist. An optional input the caller did not
    give stays absent: the library never picks up whatever happens to sit at a default path in the working
    directory (the CLI passes every input, its defaults included, explicitly)."""
    stage = load_stage(name)
    resolved: dict[str, Path | None] = {}
    for spec in stage.INPUTS:
        value = given.get(spec.name, spec.default if spec.required else None)
        path = Path(value) if value not in (None, "") else None
        if path is not None and not path.exists():
            explicit = spec.name in given and given[spec.name] != spec.default
            if spec.required or explicit:  # a mistyped path is an error, an absent default is not
                raise DataError(str(path), f"input --{spec.name.replace('_', '-')} not found ({spec.help})")
            path = None
        if path is None and spec.required:
            raise DataError(f"--{spec.name.replace('_', '-')}", f"required input missing ({spec.help})")
        resolved[spec.name] = path
    return resolved


def execute(name: str, cfg: StageConfig, inputs: dict[str, Any], out_dir: str | Path,
            limits: Limits | None = None) -> dict[str, float]:
    """Run stage `name` with `cfg` on `inputs`, publishing to `out_dir`; returns its metrics. The input files the
    stage module lists in CHECKED_INPUTS first go through the validate stage's validators with `limits` (the
    `validate` params section: `input_limits`; None = their defaults)."""
    stage = load_stage(name)
    resolved = resolve_inputs(name, inputs)
    checked = check_inputs(getattr(stage, "CHECKED_INPUTS", {}), resolved, limits or Limits())
    if not distributed.is_main_process():
        return _execute_other_rank(name, stage, cfg, resolved)
    out_dir = check_output_dir(out_dir, "--out", resolved.values(), owner=name)
    with contextlib.ExitStack() as held:  # a second run on the same --out or checkpoint folder is refused
        held.enter_context(hold(out_dir, "--out"))
        for where, path in check_config_dirs(cfg, out_dir, resolved.values()):
            held.enter_context(hold(path, where))
        return _run_and_publish(name, stage, cfg, resolved, checked, out_dir, limits or Limits())


def _run_and_publish(name: str, stage, cfg: StageConfig, resolved: dict[str, Path | None], checked: list,
                     out_dir: Path, limits: Limits) -> dict[str, float]:
    """Run the stage into a staging folder beside `out_dir` (marked as `name`'s) and move it into place."""
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    if staging.exists() and not is_ours(staging):
        raise ConfigError(str(staging), f"exists and alignpipe did not create it (no {MARKER}); remove or rename it")
    remove_ours(staging)  # a killed run's leftover
    make_output_dir(staging, str(staging), owner=name)
    if checked:
        write_json(staging / INPUT_CHECKS_FILE, {"files": checked})
    numerics = determinism.pin()  # the same thread count and kernels on every run on this machine
    start = time.perf_counter()
    try:
        with _sigterm_as_exit(), runs.stage_run(name, cfg.to_dict(), tags=numerics):
            metrics = dict(stage.run(cfg, resolved, staging))
            written = output_files(staging, getattr(stage, "CHECKED_OUTPUTS", ()))
            if written:  # e.g. data build publishes only what validate accepts
                validate_files(written, limits)
            if name != "data":  # data/ must stay byte-identical between builds: no wall-clock in it
                metrics.setdefault("seconds", round(time.perf_counter() - start, 2))
            metrics = clean_metrics(metrics)
            missing = [k for k in required_metrics(stage, resolved) if k not in metrics]
            if missing:
                raise RuntimeError(f"stage {name} did not report metrics {missing}")
            write_json(staging / METRICS_FILE, metrics)
            write_json(staging / HEADLINE_FILE, headline(metrics, getattr(stage, "HEADLINE", stage.METRICS)))
            write_curves(staging / CURVES_DIR, runs.curves())
            runs.log_metrics(metrics)
            runs.log_artifacts(staging)
    except BaseException:
        _keep_failure_report(staging, out_dir)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    remove_ours(out_dir.with_name(f"{out_dir.name}.failed"))  # a stale failure report
    check_output_dir(out_dir, "--out", owner=name)  # again: the stage ran for a while
    remove_ours(out_dir)
    staging.rename(out_dir)
    return metrics


def required_metrics(stage, resolved: dict[str, Path | None]) -> tuple[str, ...]:
    """The metric keys a stage must write: its METRICS, or its JUDGED_METRICS when the task of its `data` input
    (`alignpipe.tasks.task_of`) has no oracle and the stage reports differently then."""
    from alignpipe.tasks import task_of

    judged = getattr(stage, "JUDGED_METRICS", None)
    return judged if judged and task_of(resolved.get("data")).oracle() is None else stage.METRICS


def check_config_dirs(cfg: StageConfig, out_dir: Path, inputs) -> list[tuple[str, Path]]:
    """Every directory a config names for alignpipe to write into (`*_dir`: checkpoints) follows the `--out` rule:
    new, empty or alignpipe's own for this key (its marker names `<section>.<key>`), and neither the output, an
    input, the current directory nor a system folder. Returns them as (key, path)."""
    dirs = []
    for key, value in cfg.to_dict().items():
        if key.endswith("_dir") and key != "source_dir" and isinstance(value, str):
            where = f"{cfg.section()}.{key}"
            path = check_output_dir(value, where, [*inputs, out_dir], owner=where)
            if not path.exists() and distributed.is_main_process():
                make_output_dir(path, where, owner=where)
            dirs.append((where, path))
    return dirs


def input_limits(params: dict[str, Any]) -> Limits:
    """The validators' limits from a whole params dict: its `validate` section, the one place they are set."""
    validate = load_stage("validate")
    return validate.Config.from_dict(params.get(validate.Config.SECTION) or {}).limits()


def _keep_failure_report(staging: Path, out_dir: Path) -> None:
    """A failed stage publishes nothing, but the report it wrote to say why (report.html, report.json) is moved
    to `<out_dir>.failed/` so the user can open it."""
    kept = [staging / name for name in ("report.html", "report.json") if (staging / name).is_file()]
    if not any(p.name == "report.html" for p in kept):
        return
    failed = out_dir.with_name(f"{out_dir.name}.failed")
    remove_ours(failed)
    if failed.exists():
        print(f"alignpipe: {failed} exists and is not alignpipe's; failure report not kept", file=sys.stderr)
        return
    make_output_dir(failed, str(failed))
    for path in kept:
        path.rename(failed / path.name)
    print(f"alignpipe: failure report kept in {failed / 'report.html'}", file=sys.stderr)


def _execute_other_rank(name: str, stage, cfg: StageConfig, resolved: dict[str, Path | None]) -> dict[str, float]:
    """A rank > 0 of a distributed launch: run the stage into a throwaway folder (removed afterwards) and return
    its metrics; rank 0 alone writes metrics.json, logs to MLflow and publishes."""
    scratch = Path(tempfile.mkdtemp(prefix=f"alignpipe-{name}-rank{distributed.process_rank()}-"))
    determinism.pin()
    try:
        return clean_metrics(dict(stage.run(cfg, resolved, scratch)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def _sigterm_as_exit():
    """Turn SIGTERM (Kubernetes deleting the pod, `kill`, DVC/KFP cancelling) and SIGHUP (the terminal or SSH
    session closed) into SystemExit while a stage runs, so the MLflow run ends as FAILED instead of staying RUNNING
    and the staging folder is removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    # a signal the caller chose to ignore (`nohup` ignores SIGHUP) stays ignored
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)
                if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)
