"""What `alignpipe serve MODEL_URI` serves: the ONNX policy (and reward model) of a registered serving model
(`models:/alignpipe-policy-onnx@champion`, downloaded from the registry) or of a local folder (an export stage's
output, or a downloaded pyfunc serving model), with the settings register logged in its model_config."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alignpipe.core.errors import DataError

REWARD_SETTINGS = ("max_length", "prompt_lines", "pad_token_id")


@dataclass
class Served:
    """A model to serve: its id (what /v1/models lists), files and settings."""

    name: str
    task: str  # "pep8", "chat", ...: prompts, stop rule and cleaning (alignpipe.tasks)
    policy_onnx: Path
    tokenizer: Path  # the policy's tokenizer folder with alignpipe.json
    config: dict[str, Any]  # POLICY_DEFAULTS with the logged model_config
    reward_onnx: Path | None = None
    reward_tokenizer: Path | None = None
    reward_config: dict[str, Any] = field(default_factory=dict)
    no_reward: str = ""  # why there is no reward model, when there is none
    workdir: Any = None  # the temporary folder of downloaded files (kept alive with this object)


def resolve(uri: str, reward_uri: str | None = None) -> Served:
    """The `Served` of a `models:/NAME@ALIAS` (or `models:/NAME/VERSION`) URI or a local folder. The reward model is
    `reward_uri` when given, else the export folder's `reward.onnx`, else `models:/alignpipe-reward-onnx@ALIAS` for
    the policy's registered ONNX name at the same alias."""
    from alignpipe.serving.models import POLICY_DEFAULTS

    tmp = tempfile.TemporaryDirectory(prefix="alignpipe-serve-")
    local = Path(uri)
    if not uri.startswith("models:/") and not local.is_dir():
        raise DataError(uri, "not a models:/NAME@ALIAS URI or a folder")
    folder = local if local.is_dir() else _download(uri, Path(tmp.name) / "policy")
    if (folder / "MLmodel").is_file():
        flavor, model_dir = _pyfunc(folder), folder
        artifacts = flavor.get("artifacts") or {}
        if "policy_onnx" not in artifacts:
            raise DataError(str(folder / "MLmodel"), "not an alignpipe ONNX policy serving model (no policy_onnx "
                            "artifact): serve models:/alignpipe-policy-onnx@ALIAS")
        config = flavor.get("config") or {}
        chat = flavor.get("loader_module") == "mlflow.pyfunc.loaders.chat_model"
        served = Served(_name(uri, folder), config.get("task") or ("chat" if chat else "pep8"),
                        model_dir / artifacts["policy_onnx"]["path"], model_dir / artifacts["tokenizer"]["path"],
                        {**POLICY_DEFAULTS, **config}, workdir=tmp,
                        no_reward="started from a folder without reward.onnx (give --reward URI)")
    elif (folder / "policy.onnx").is_file() and (folder / "policy_tokenizer").is_dir():
        served = _export_folder(folder, POLICY_DEFAULTS, tmp)
    else:
        raise DataError(str(folder), "holds neither an MLmodel (a serving model) nor policy.onnx with "
                        "policy_tokenizer/ (an export folder)")
    if reward_uri is None and uri.startswith("models:/") and served.reward_onnx is None:
        name, sep, alias = uri[len("models:/"):].partition("@")
        from alignpipe.tracking.policies import POLICY_ONNX_NAME, REWARD_ONNX_NAME
        from alignpipe.tracking.registry import model_version_by_alias

        if sep and name == POLICY_ONNX_NAME and model_version_by_alias(REWARD_ONNX_NAME, alias):
            reward_uri = f"models:/{REWARD_ONNX_NAME}@{alias}"
        elif served.reward_onnx is None:
            served.no_reward = f"no {REWARD_ONNX_NAME}@{alias or '?'} in the registry (start with --reward URI)"
    if reward_uri is not None:
        _attach_reward(served, reward_uri, Path(tmp.name) / "reward")
    return served


def _download(uri: str, dst: Path) -> Path:
    from alignpipe.tracking.registry import download_model

    try:
        return download_model(uri, dst)
    except Exception as e:  # MLflow raises several types for a missing model, alias or store
        raise DataError(uri, f"cannot download it from the registry: {type(e).__name__}: "
                        f"{(str(e).strip().splitlines() or [''])[0][:300]}") from None


def _pyfunc(folder: Path) -> dict[str, Any]:
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    flavor = (mlmodel.get("flavors") or {}).get("python_function")
    if not isinstance(flavor, dict):
        raise DataError(str(folder / "MLmodel"), "no python_function flavor")
    return flavor


def _name(uri: str, folder: Path) -> str:
    """The served model's id: the registered name of a models:/ URI, else the folder's name."""
    if uri.startswith("models:/"):
        return uri[len("models:/"):].split("@")[0].split("/")[0]
    return folder.resolve().name


def _export_folder(folder: Path, defaults: dict[str, Any], tmp) -> Served:
    """An export stage's output: policy.onnx, policy_tokenizer/ and, when there, reward.onnx with
    reward_tokenizer/. Its task: chat when the parity prompts it checked were conversations (report.json)."""
    from alignpipe.serving.models import reward_settings

    report_path = folder / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    prompts = [p.get("prompt") for p in (report.get("parity") or {}).get("prompts", [])]
    task = "chat" if prompts and isinstance(prompts[0], list) else "pep8"
    served = Served(folder.resolve().name, task, folder / "policy.onnx", folder / "policy_tokenizer",
                    dict(defaults), workdir=tmp)
    if (folder / "reward.onnx").is_file() and (folder / "reward_tokenizer").is_dir():
        reward_config = Path(report.get("reward_dir", "")) / "config.json"
        if report.get("reward_dir") and reward_config.is_file():
            served.reward_onnx, served.reward_tokenizer = folder / "reward.onnx", folder / "reward_tokenizer"
            served.reward_config = reward_settings(json.loads(reward_config.read_text()))
        else:
            served.no_reward = (f"{folder}/reward.onnx is there but not the reward model's config.json (its prompt "
                                "lines and padding; report.json's reward_dir): give --reward models:/...")
    else:
        served.no_reward = f"{folder} has no reward.onnx"
    return served


def _attach_reward(served: Served, uri: str, dst: Path) -> None:
    folder = Path(uri) if Path(uri).is_dir() else _download(uri, dst)
    flavor = _pyfunc(folder) if (folder / "MLmodel").is_file() else {}
    artifacts = flavor.get("artifacts") or {}
    if "reward_onnx" not in artifacts:
        raise DataError(uri, "not an alignpipe ONNX reward serving model (no reward_onnx artifact)")
    served.reward_onnx = folder / artifacts["reward_onnx"]["path"]
    served.reward_tokenizer = folder / artifacts["tokenizer"]["path"]
    served.reward_config = {k: v for k, v in (flavor.get("config") or {}).items() if k in REWARD_SETTINGS}
    served.no_reward = ""
