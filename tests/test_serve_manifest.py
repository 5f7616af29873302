"""`alignpipe serve kserve-manifest`: the InferenceService it writes fits KServe's CRD schema (v1beta1, the fields
it uses: tests/data/kserve_isvc_v1beta1_schema.json, cut from kserve/kserve by tests/data/make_kserve_schema.py)
and names the champion's version and image; with `--runtime huggingface` (a chat champion on GPU nodes) it runs
KServe's Hugging Face runtime with the vLLM backend on the registered transformers model's artifact location."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from alignpipe.cli import main as cli
from alignpipe.tracking import registry

SCHEMA = json.loads((Path(__file__).parent / "data" / "kserve_isvc_v1beta1_schema.json").read_text())
TYPES = {"object": dict, "array": list, "string": str, "integer": int, "boolean": bool}


def violations(value, schema: dict, path: str = "") -> list[str]:
    """Where `value` breaks `schema` (types, required keys, unknown keys, int-or-string)."""
    if schema.get("x-kubernetes-int-or-string"):
        return [] if isinstance(value, (int, str)) and not isinstance(value, bool) else [f"{path}: not int-or-string"]
    kind = schema.get("type")
    if kind and not (isinstance(value, TYPES[kind]) and not (kind == "integer" and isinstance(value, bool))):
        return [f"{path}: {type(value).__name__}, schema wants {kind}"]
    out = []
    if isinstance(value, dict):
        out += [f"{path}.{k}: required" for k in schema.get("required", []) if k not in value]
        for k, v in value.items():
            if k in schema.get("properties", {}):
                out += violations(v, schema["properties"][k], f"{path}.{k}")
            elif "additionalProperties" in schema:
                out += violations(v, schema["additionalProperties"], f"{path}.{k}")
            else:
                out.append(f"{path}.{k}: not in the schema")
    if isinstance(value, list):
        for i, v in enumerate(value):
            out += violations(v, schema.get("items", {}), f"{path}[{i}]")
    return out


@pytest.mark.parametrize("gpu", [0, 1])
def test_manifest_fits_the_kserve_schema_and_names_the_champion(tmp_path, monkeypatch, capsys, gpu):
    monkeypatch.setattr(registry, "model_version_by_alias",
                        lambda name, alias: {"version": "7", "source": "", "run_id": "", "tags": {}}
                        if (name, alias) == ("alignpipe-policy-onnx", "champion") else None)
    out = tmp_path / "isvc.yaml"
    assert cli.main(["serve", "kserve-manifest", "--registry", "reg.local/ap", "--gpu", str(gpu),
                     "--out", str(out)]) == 0
    manifest = yaml.safe_load(out.read_text())
    assert violations(manifest, SCHEMA) == []
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1" and manifest["kind"] == "InferenceService"
    container = manifest["spec"]["predictor"]["containers"][0]
    assert container["image"] == "reg.local/ap/alignpipe-policy-onnx:v7"
    assert manifest["metadata"]["annotations"]["alignpipe/model-version"] == "7"
    assert container["readinessProbe"]["httpGet"] == {"path": "/ping", "port": 8080}
    assert ("nvidia.com/gpu" in container["resources"]["limits"]) == bool(gpu)


def test_schema_check_catches_misspelt_and_mistyped_fields():
    from alignpipe.cli.serve import kserve_manifest

    good = kserve_manifest("p", "img", model_uri="models:/m@champion", version="1", threads=2, cpu="2",
                           memory="2Gi")
    assert violations(good, SCHEMA) == []
    bad = json.loads(json.dumps(good))
    bad["spec"]["predictor"]["containers"][0]["readinesProbe"] = bad["spec"]["predictor"]["containers"][0].pop(
        "readinessProbe")
    bad["spec"]["predictor"]["minReplicas"] = "1"
    del bad["spec"]["predictor"]["containers"][0]["name"]
    assert sorted(violations(bad, SCHEMA)) == [
        ".spec.predictor.containers[0].name: required",
        ".spec.predictor.containers[0].readinesProbe: not in the schema",
        ".spec.predictor.minReplicas: str, schema wants integer"]


def test_no_champion_and_no_image_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(registry, "model_version_by_alias", lambda name, alias: None)
    out = tmp_path / "isvc.yaml"
    assert cli.main(["serve", "kserve-manifest", "--out", str(out)]) != 0
    assert "no version of 'alignpipe-policy-onnx' carries alias 'champion'" in capsys.readouterr().err
    assert not out.exists()


def test_hugging_face_runtime_manifest_for_a_chat_champion(tmp_path, monkeypatch):
    store = "s3://bucket/mlflow/1/models/m-abc/artifacts"
    monkeypatch.setattr(registry, "model_version_by_alias",
                        lambda name, alias: {"version": "3", "source": "", "run_id": "", "tags": {}}
                        if (name, alias) == ("alignpipe-policy", "champion") else None)
    monkeypatch.setattr(registry, "download_uri", lambda name, version: store if (name, version) ==
                        ("alignpipe-policy", "3") else pytest.fail(f"asked for {name} {version}"))
    out = tmp_path / "isvc.yaml"
    assert cli.main(["serve", "kserve-manifest", "--runtime", "huggingface", "--name", "chat-champion",
                     "--out", str(out)]) == 0
    manifest = yaml.safe_load(out.read_text())
    assert violations(manifest, SCHEMA) == []
    model = manifest["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "huggingface"} and model["storageUri"] == store
    # the transformers flavor's layout: weights in model/, tokenizer (and chat template) in components/tokenizer/
    assert model["args"] == ["--model_name=chat-champion", "--model_dir=/mnt/models/model",
                             "--tokenizer=/mnt/models/components/tokenizer", "--backend=vllm"]
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "containers" not in manifest["spec"]["predictor"]
    assert manifest["metadata"]["annotations"] == {"alignpipe/model-uri": "models:/alignpipe-policy@champion",
                                                   "alignpipe/model-version": "3"}
    bad = json.loads(json.dumps(manifest))
    bad["spec"]["predictor"]["model"]["modelFormat"] = {"nmae": "huggingface"}
    assert violations(bad, SCHEMA) == [".spec.predictor.model.modelFormat.name: required",
                                       ".spec.predictor.model.modelFormat.nmae: not in the schema"]


def test_hugging_face_runtime_refuses_a_store_pods_cannot_read(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(registry, "model_version_by_alias",
                        lambda name, alias: {"version": "1", "source": "", "run_id": "", "tags": {}})
    monkeypatch.setattr(registry, "download_uri", lambda name, version: "/home/me/mlruns/1/models/m-x/artifacts")
    out = tmp_path / "isvc.yaml"
    assert cli.main(["serve", "kserve-manifest", "--runtime", "huggingface", "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--storage-uri" in err[0] and "cannot read" in err[0]
    assert not out.exists()
    assert cli.main(["serve", "kserve-manifest", "--runtime", "huggingface", "--storage-uri", "pvc://models/chat",
                     "--out", str(out)]) == 0
    assert yaml.safe_load(out.read_text())["spec"]["predictor"]["model"]["storageUri"] == "pvc://models/chat"
