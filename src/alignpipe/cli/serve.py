"""`alignpipe serve kserve-manifest`: the KServe InferenceService of a registered model's serving image.

The image is what `mlflow models generate-dockerfile -m models:/NAME@ALIAS` builds (nginx on port 8080 in front of
uvicorn: GET /ping, POST /invocations), run as a custom predictor container. The registered version is looked up
so the manifest names the image tag and the version it serves.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from alignpipe.core.errors import ConfigError
from alignpipe.core.outputs import write_output_file

PORT = 8080  # the port of the image's nginx (mlflow's generated Dockerfile)


def kserve_manifest(name: str, image: str, *, model_uri: str, version: str | None, workers: int, cpu: str,
                    memory: str, gpu: int = 0, min_replicas: int = 1, max_replicas: int = 1) -> dict[str, Any]:
    """A `serving.kserve.io/v1beta1` InferenceService running `image` as the predictor's one container."""
    limits = {"cpu": cpu, "memory": memory, **({"nvidia.com/gpu": str(gpu)} if gpu else {})}
    container = {
        "name": "kserve-container", "image": image,
        "ports": [{"containerPort": PORT, "protocol": "TCP"}],
        # one uvicorn worker per CPU of the pod: each holds the model and batches its concurrent requests
        "env": [{"name": "MLFLOW_MODELS_WORKERS", "value": str(workers)}],
        "readinessProbe": {"httpGet": {"path": "/ping", "port": PORT}, "initialDelaySeconds": 5, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/ping", "port": PORT}, "initialDelaySeconds": 30,
                          "periodSeconds": 10},
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": limits},
    }
    annotations = {"alignpipe/model-uri": model_uri}
    if version is not None:
        annotations["alignpipe/model-version"] = str(version)
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": name, "annotations": annotations, "labels": {"app.kubernetes.io/part-of": "alignpipe"}},
            "spec": {"predictor": {"minReplicas": min_replicas, "maxReplicas": max_replicas,
                                   "containers": [container]}}}


def cmd_kserve_manifest(args: argparse.Namespace) -> int:
    from alignpipe.tracking import registry

    if not args.name.replace("-", "").isalnum() or args.name != args.name.lower() or len(args.name) > 63:
        raise ConfigError("--name", f"{args.name!r} is not a DNS-1035 label (lowercase letters, digits, '-')")
    info = registry.model_version_by_alias(args.model, args.alias)
    if info is None and args.image is None:
        raise ConfigError("--model", f"no version of {args.model!r} carries alias {args.alias!r} (give --image)")
    version = info["version"] if info else None
    image = args.image or f"{args.registry.rstrip('/')}/{args.model}:v{version}"
    manifest = kserve_manifest(args.name or args.model, image, model_uri=f"models:/{args.model}@{args.alias}",
                               version=version, workers=args.workers, cpu=args.cpu, memory=args.memory,
                               gpu=args.gpu)
    text = yaml.safe_dump(manifest, sort_keys=False)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        write_output_file(args.out, text, force=args.force)
        print(f"wrote {args.out} ({args.model} version {version}, image {image})")
    return 0


def add_serve_parser(sub) -> None:
    serve = sub.add_parser("serve", help="serving: deployment manifests for the registered champion")
    serve_sub = serve.add_subparsers(dest="serve_command", required=True, metavar="ACTION")
    p = serve_sub.add_parser("kserve-manifest", help="KServe InferenceService YAML for MODEL@ALIAS's serving image")
    p.add_argument("--model", default="alignpipe-policy-onnx", help="registered model (default: %(default)s)")
    p.add_argument("--alias", default="champion", help="alias to serve (default: %(default)s)")
    p.add_argument("--name", default="alignpipe-policy", help="InferenceService name (default: %(default)s)")
    p.add_argument("--image", help="serving image (default: REGISTRY/MODEL:vVERSION)")
    p.add_argument("--registry", default="registry.example.internal/alignpipe",
                   help="image registry for the default image name (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="uvicorn workers in the pod (default: %(default)s)")
    p.add_argument("--cpu", default="2", help="CPU request and limit (default: %(default)s)")
    p.add_argument("--memory", default="2Gi", help="memory request and limit (default: %(default)s)")
    p.add_argument("--gpu", type=int, default=0, help="nvidia.com/gpu limit (default: %(default)s)")
    p.add_argument("--out", default="-", help="output file, - for stdout (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace --out even if alignpipe did not write it")
    p.set_defaults(func=cmd_kserve_manifest)
