"""Regenerate kserve_isvc_v1beta1_schema.json: the openAPIV3Schema of KServe's InferenceService CRD (v1beta1),
cut down to the fields that `alignpipe serve kserve-manifest` writes with either runtime (every property name kept at
the levels it uses, so a misspelt key is still caught).

    git clone https://github.com/kserve/kserve && python tests/data/make_kserve_schema.py \
        kserve/config/crd/full/serving.kserve.io_inferenceservices.yaml COMMIT
"""

import json
import sys
from pathlib import Path

import yaml

from alignpipe.cli.serve import kserve_hf_manifest, kserve_manifest


def prune(schema: dict, value) -> dict:
    out = {k: schema[k] for k in ("type", "required", "x-kubernetes-int-or-string", "anyOf") if k in schema}
    if isinstance(value, dict) and "properties" in schema:
        out["properties"] = {k: (prune(sub, value[k]) if k in value else {}) for k, sub in schema["properties"].items()}
    if isinstance(value, dict) and "additionalProperties" in schema:
        out["additionalProperties"] = {k: v for k, v in schema["additionalProperties"].items() if k != "description"}
    if isinstance(value, list) and "items" in schema:
        out["items"] = prune(schema["items"], value[0])
    return out


def merge(a, b):
    """Both manifests' fields in one value (lists: their first items merged), to prune the schema against."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: merge(a[k], b[k]) if k in a and k in b else a.get(k, b.get(k)) for k in {**a, **b}}
    if isinstance(a, list) and isinstance(b, list) and a and b:
        return [merge(a[0], b[0])]
    return a


def main(crd_path: str, commit: str) -> None:
    crd = yaml.safe_load(Path(crd_path).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")
    manifest = merge(kserve_manifest("x", "img", model_uri="models:/m@champion", version="1", threads=2, cpu="2",
                                     memory="2Gi", gpu=1),
                     kserve_hf_manifest("x", "s3://b/m", model_uri="models:/m@champion", version="1", served_name="x",
                                        cpu="2", memory="2Gi", gpu=1))
    schema = prune(version["schema"]["openAPIV3Schema"], manifest)
    # The CRD leaves metadata to Kubernetes (ObjectMeta): the three fields used, as the API server types them.
    strings = {"type": "object", "additionalProperties": {"type": "string"}}
    schema["properties"]["metadata"] = {"type": "object", "required": ["name"], "x-note": "ObjectMeta (Kubernetes)",
                                        "properties": {"name": {"type": "string"}, "annotations": strings,
                                                       "labels": strings}}
    schema["x-source"] = {"repository": "kserve/kserve", "commit": commit,
                          "path": "config/crd/full/serving.kserve.io_inferenceservices.yaml"}
    out = Path(__file__).with_name("kserve_isvc_v1beta1_schema.json")
    out.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
