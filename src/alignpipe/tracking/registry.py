"""The MLflow model registry: registered versions, aliases, tags, downloads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignpipe.core.errors import ConfigError, DataError
from alignpipe.tracking.runs import mlflow_module as _mlflow, tracking_uri


def client():
    """An MlflowClient on the configured store (for the registry: register, aliases, queries)."""
    uri = tracking_uri()
    return _mlflow().MlflowClient(tracking_uri=uri, registry_uri=uri)


def pip_requirements(*packages: str) -> list[str]:
    """`name==version` of installed packages, for a logged model's explicit pip requirements (MLflow's own
    inference of them imports torchvision, which is not installed)."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in packages]


def text_signature(example_input: str, example_output, params: dict[str, Any] | None = None):
    """A model signature for string inputs, inferred from one example, with optional inference params."""
    from mlflow.models import infer_signature

    _mlflow()
    return infer_signature([example_input], example_output, params=params)


def log_transformers_model(components: dict[str, Any], name: str, task: str, registered_model_name: str,
                           **kwargs: Any) -> str:
    """Log a transformers model (`{"model": ..., "tokenizer": ...}`) to the active run with the transformers
    flavor and register it as a new version of `registered_model_name`; returns the version number."""
    mlflow = _mlflow()
    info = mlflow.transformers.log_model(components, name=name, task=task,
                                         registered_model_name=registered_model_name, **kwargs)
    return str(info.registered_model_version)


def model_version_by_alias(name: str, alias: str) -> dict[str, Any] | None:
    """`name@alias` as {"version", "source", "run_id", "tags"}; None when the model does not exist or the alias
    never pointed anywhere. A dangling alias is a DataError, never "no champion yet": the alias is set but its
    version is gone, or the registry's alias history (`record_alias_move`) names a version the alias no longer
    marks (MLflow drops an alias with its deleted version)."""
    _mlflow()
    from mlflow.exceptions import MlflowException

    c = client()
    try:
        model = c.get_registered_model(name)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    where = f"{name}@{alias}"
    fix = (f"point it at an existing version (MlflowClient().set_registered_model_alias({name!r}, {alias!r}, V)) "
           "or register under a new model name")
    if alias not in (model.aliases or {}):
        last = last_alias_move(model.description or "", alias)
        if last is None:
            return None
        raise DataError(where, f"the alias is gone: version {last} it was moved to (the registry's history) no "
                        f"longer carries it (deleted?); {fix}")
    try:
        mv = c.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise DataError(where, f"points to version {model.aliases[alias]}, which does not exist; {fix}") from None
        raise
    return {"version": str(mv.version), "source": mv.source, "run_id": mv.run_id, "tags": dict(mv.tags)}


def download_uri(name: str, version: str) -> str:
    """Where the files of `name` version `version` are stored (the artifact location a cluster reads them from)."""
    return client().get_model_version_download_uri(name, str(version))


def last_alias_move(description: str, alias: str) -> str | None:
    """The version the last `record_alias_move` line of a registered model's description moved `alias` to."""
    import re

    moves = re.findall(rf"^\S+ {re.escape(alias)}: version \S+ -> (\S+) \(", description, flags=re.M)
    return moves[-1] if moves else None


def check_model_names(*names: str) -> None:
    """A ConfigError unless every registered-model name is one MLflow accepts (checked before anything is
    registered, so a bad second name never leaves the first model half-registered)."""
    _mlflow()
    from mlflow.exceptions import MlflowException

    c = client()
    for name in names:
        try:
            c.get_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise ConfigError(f"registered model name {name!r}", e.message.splitlines()[0][:200]) from None


def set_model_alias(name: str, alias: str, version: str) -> None:
    """Point `name@alias` at `version`."""
    client().set_registered_model_alias(name, alias, str(version))


def set_model_version_tags(name: str, version: str, tags: dict[str, Any]) -> None:
    """Tag one model version (values are stored as strings; MLflow caps a tag value at 5000 characters)."""
    c = client()
    for k, v in tags.items():
        c.set_model_version_tag(name, str(version), k, str(v)[:5000])


def download_model(model_uri: str, dst: str | Path) -> Path:
    """Download a logged or registered model (e.g. `models:/alignpipe-policy@champion`) into `dst`."""
    mlflow = _mlflow()
    Path(dst).mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))


def record_alias_move(name: str, alias: str, before: str | None, after: str, why: str,
                      metrics: dict[str, Any]) -> str:
    """Record that `name@alias` moved from version `before` to `after`: tags on both versions (since/until, from/to,
    why, metrics) and one line appended to the registered model's description, the champion history users see in
    the registry UI. Returns that line."""
    from datetime import datetime, timezone

    when = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    shown = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    line = f"{when} {alias}: version {before or 'none'} -> {after} ({why}; {shown})"
    c = client()
    set_model_version_tags(name, after, {f"{alias}.since": when, f"{alias}.from": before or "none",
                                         f"{alias}.why": why, f"{alias}.metrics": shown})
    if before is not None:
        set_model_version_tags(name, before, {f"{alias}.until": when, f"{alias}.replaced_by": after})
    description = c.get_registered_model(name).description or ""
    c.update_registered_model(name, description=(description.rstrip("\n") + "\n" + line).lstrip("\n"))
    return line
