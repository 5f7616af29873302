"""Policies in MLflow: a registered policy back as a policy directory (the champion that evaluate compares
against), and the ONNX exports of a policy and reward model, logged to the export run and registered next to their
PyTorch versions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

from alignpipe.core.errors import DataError
from alignpipe.core.io import read_json
from alignpipe.tracking import registry
from alignpipe.tracking.runs import mlflow_module

POLICY_ONNX_NAME = "alignpipe-policy-onnx"
REWARD_ONNX_NAME = "alignpipe-reward-onnx"


def champion_policy(model_name: str, alias: str, work_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """(registry info, local policy dir) of `model_name@alias` downloaded under `work_dir`, or None when no
    version carries the alias."""
    info = registry.model_version_by_alias(model_name, alias)
    if info is None:
        return None
    uri = f"models:/{model_name}@{alias}"
    local = registry.download_model(uri, work_dir / "mlflow_model")
    info = {"model": model_name, "alias": alias, "uri": uri, "version": info["version"]}
    return info, policy_dir_from_mlflow_model(local, work_dir / "policy")


def policy_dir_from_mlflow_model(model_dir: str | Path, out_dir: str | Path) -> Path:
    """A policy directory (weights, tokenizer, alignpipe.json) from a downloaded transformers-flavor model
    logged by `alignpipe register` (weights in `model/`, tokenizer in `components/tokenizer/`, meta in MLmodel)."""
    import yaml

    from alignpipe.lm.policy import META_FILE

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    meta = (mlmodel.get("metadata") or {}).get("alignpipe")
    if not (model_dir / "model").is_dir() or meta is None:
        raise DataError(str(model_dir), "not a policy logged by `alignpipe register` (no model/ or alignpipe "
                        "metadata in MLmodel)")
    out_dir.mkdir(parents=True, exist_ok=True)
    for sub in (model_dir / "model", model_dir / "components" / "tokenizer"):
        for path in sub.iterdir():
            if path.is_file():
                shutil.copy2(path, out_dir / path.name)
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out_dir


def log_onnx_model(path: Path, name: str, io: dict[str, list[dict]], providers: list[str], *,
                   metadata: dict[str, str], extra_files: list[str]) -> dict[str, str]:
    """Log the ONNX graph at `path` to the active run with MLflow's onnx flavor as `name`: a tensor signature from
    `io` (`alignpipe.lm.onnx_runtime.io_signature`'s inputs and outputs; -1 on every dynamic axis), served with
    onnxruntime's `providers` and every graph optimisation. Returns {"model_uri", "model_id"} of the logged model."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    mlflow = mlflow_module()
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}

    def schema(specs):
        return mlflow.types.Schema([
            mlflow.types.TensorSpec(np.dtype(dtypes[s["type"]]), tuple(-1 if d is None else d for d in s["shape"]),
                                    s["name"]) for s in specs])

    info = mlflow.onnx.log_model(
        onnx.load(str(path)), name=name,
        signature=mlflow.models.ModelSignature(inputs=schema(io["inputs"]), outputs=schema(io["outputs"])),
        pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={ort.__version__}"],
        onnx_execution_providers=providers, onnx_session_options={"graph_optimization_level": 99},
        metadata=metadata, save_as_external_data=False, extra_files=extra_files)
    return {"model_uri": info.model_uri, "model_id": info.model_id}


def check_onnx_exports(export_dir: str | Path) -> dict[str, str]:
    """{"policy", "reward"}: the sha256 of the export folder's policy.onnx and reward.onnx, each the very graph the
    export stage checked against PyTorch (the sha256 in onnx_models.json) and loadable by onnxruntime; a DataError
    naming the file otherwise. Called before anything is registered: what gets logged is what was checked."""
    import hashlib

    where = Path(export_dir) / "onnx_models.json"
    record = read_json(where)
    out = {}
    for key in ("policy", "reward"):
        entry = (record.get("models") or {}).get(key) if isinstance(record, dict) else None
        path = Path(export_dir) / f"{key}.onnx"
        if not isinstance(entry, dict) or not path.is_file():
            raise DataError(str(path), f"missing, or not listed in {where.name}: re-run export")
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != entry.get("sha256"):
            raise DataError(str(path), f"sha256 {h.hexdigest()[:12]} is not the graph export checked against PyTorch "
                            f"({str(entry.get('sha256'))[:12]}, {where.name}): refusing to register it")
        _check_loads(path)
        out[key] = h.hexdigest()
    return out


def _check_loads(path: Path) -> None:
    """A DataError unless onnxruntime can open the graph at `path`."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 (onnxruntime raises its own Fail/InvalidGraph/... types, not exported)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(str(path), f"onnxruntime cannot load it: {first}") from None


def register_onnx(export_dir: str | Path, policy_version: str | int, reward_version: str | int, client, *,
                  policy_name: str = "alignpipe-policy", reward_name: str = "alignpipe-reward",
                  precision: Literal["fp32", "int8"] = "fp32", candidate: str | None = None,
                  serving: dict[str, Any] | None = None, logged_sha256: dict[str, str] | None = None
                  ) -> dict[str, Any]:
    """Register the ONNX models logged by an export run as versions of `alignpipe-policy-onnx` and
    `alignpipe-reward-onnx`, tagged with the PyTorch registered versions they were exported from.

    `export_dir` holds the export stage's `onnx_models.json`; `client` is an MlflowClient
    (`alignpipe.tracking.registry.client()`); `candidate`, when given, must be the candidate that was exported (so
    a policy version is never linked to another candidate's graph); `serving`, when given, maps "policy" and
    "reward" to the ModelInfo of the pyfunc serving models (`alignpipe.serving.models`) that wrap these
    graphs: the versions then point at those (what `mlflow models serve` runs) instead of the bare ONNX models,
    tagged with `logged_sha256` ("policy"/"reward": the sha256 of the graph file those models logged,
    `check_onnx_exports`). Returns {registered name: ModelVersion}.
    """
    where = Path(export_dir) / "onnx_models.json"
    record = read_json(where)
    if not record.get("run_id"):
        raise DataError(str(where), "the ONNX models were not logged to an MLflow run (export ran outside one)")
    if candidate is not None and candidate != record["candidate"]:
        raise DataError(str(where), f"exported candidate is {record['candidate']!r}, not {candidate!r}")
    suffix = "" if precision == "fp32" else f"_{precision}"
    targets = [(POLICY_ONNX_NAME, f"policy{suffix}", policy_name, policy_version),
               (REWARD_ONNX_NAME, f"reward{suffix}", reward_name, reward_version)]
    versions = {}
    for onnx_name, key, torch_name, torch_version in targets:
        entry = record["models"].get(key)
        if not entry or not entry.get("model_uri"):
            raise DataError(str(where), f"no logged {key} model (was export run with quantize for int8?)")
        if not client.search_registered_models(filter_string=f"name = '{onnx_name}'"):
            client.create_registered_model(onnx_name, description=f"ONNX export of {torch_name}")
        tags = {"alignpipe.pytorch_model": torch_name, "alignpipe.pytorch_version": str(torch_version),
                "alignpipe.export_run_id": record["run_id"], "alignpipe.precision": precision,
                "alignpipe.sha256": entry["sha256"]}
        if key.startswith("policy"):
            tags.update({"alignpipe.candidate": record["candidate"],
                         "alignpipe.greedy_match_frac": str(record["parity"]["greedy_match_frac"]),
                         "alignpipe.max_abs_diff": str(record["parity"]["max_abs_diff_policy"])})
        else:
            tags["alignpipe.max_abs_diff"] = str(record["parity"]["max_abs_diff_reward"])
        source, run_id, model_id = entry["model_uri"], record["run_id"], entry["model_id"]
        info = (serving or {}).get(key.split("_")[0])
        if info is not None:
            source, run_id, model_id = info.model_uri, info.run_id, info.model_id
            tags["alignpipe.serving"] = "pyfunc: onnxruntime, batched (alignpipe.serving.models)"
            if (logged_sha256 or {}).get(key.split("_")[0]):  # the graph the serving model logged
                tags["alignpipe.sha256"] = logged_sha256[key.split("_")[0]]
        versions[onnx_name] = client.create_model_version(onnx_name, source=source, run_id=run_id, tags=tags,
                                                          model_id=model_id)
    return versions
