"""`alignpipe serve MODEL_URI`: the OpenAI-compatible server (`alignpipe.serving.openai_api`), and
`alignpipe serve kserve-manifest`: the KServe InferenceService of a registered model.

`--runtime custom` (CPU, the ONNX champion): the serving image (`make image-serve`: `alignpipe serve` on port 8080,
GET /ping, the /v1 routes) run as a custom predictor container; the image tag names the registered version.
`--runtime huggingface` (GPU, a chat champion): KServe's Hugging Face runtime with its vLLM backend (OpenAI routes
under /openai/v1) reading the transformers-flavor model (`alignpipe-policy`) from its artifact location: weights in
`model/`, tokenizer and chat template in `components/tokenizer/`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from alignpipe.core.errors import ConfigError
from alignpipe.core.outputs import write_output_file
from alignpipe.core.redaction import redact_text

PORT = 8080  # the port of the serving image (docker/Dockerfile.serve)


def kserve_manifest(name: str, image: str, *, model_uri: str, version: str | None, threads: int, cpu: str,
                    memory: str, gpu: int = 0, min_replicas: int = 1, max_replicas: int = 1) -> dict[str, Any]:
    """A `serving.kserve.io/v1beta1` InferenceService running `image` as the predictor's one container."""
    limits = {"cpu": cpu, "memory": memory, **({"nvidia.com/gpu": str(gpu)} if gpu else {})}
    container = {
        "name": "kserve-container", "image": image,
        "ports": [{"containerPort": PORT, "protocol": "TCP"}],
        # one worker (decoder loop) per CPU of the pod's limit, each with this many onnxruntime threads
        "env": [{"name": "ALIGNPIPE_SERVE_THREADS", "value": str(threads)}],
        "readinessProbe": {"httpGet": {"path": "/ping", "port": PORT}, "initialDelaySeconds": 5, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/health", "port": PORT}, "initialDelaySeconds": 30,
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


# Schemes KServe's storage initializer downloads from (a local path or mlflow-artifacts: is not reachable from a pod)
STORAGE_SCHEMES = ("s3://", "gs://", "https://", "hdfs://", "webhdfs://", "pvc://", "hf://", "oci://")
MODEL_DIR = "/mnt/models"  # where KServe puts the storageUri's files


def kserve_hf_manifest(name: str, storage_uri: str, *, model_uri: str, version: str | None, served_name: str,
                       cpu: str, memory: str, gpu: int = 1, min_replicas: int = 1,
                       max_replicas: int = 1) -> dict[str, Any]:
    """A `serving.kserve.io/v1beta1` InferenceService on KServe's Hugging Face runtime (vLLM backend, OpenAI
    routes) serving the transformers-flavor model stored at `storage_uri`."""
    limits = {"cpu": cpu, "memory": memory, **({"nvidia.com/gpu": str(gpu)} if gpu else {})}
    annotations = {"alignpipe/model-uri": model_uri}
    if version is not None:
        annotations["alignpipe/model-version"] = str(version)
    model = {"modelFormat": {"name": "huggingface"},
             "args": [f"--model_name={served_name}", f"--model_dir={MODEL_DIR}/model",
                      f"--tokenizer={MODEL_DIR}/components/tokenizer", "--backend=vllm"],
             "storageUri": storage_uri,
             "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": limits}}
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": name, "annotations": annotations, "labels": {"app.kubernetes.io/part-of": "alignpipe"}},
            "spec": {"predictor": {"minReplicas": min_replicas, "maxReplicas": max_replicas, "model": model}}}


def cmd_kserve_manifest(args: argparse.Namespace) -> int:
    from alignpipe.tracking import registry

    if not args.name.replace("-", "").isalnum() or args.name != args.name.lower() or len(args.name) > 63:
        raise ConfigError("--name", f"{args.name!r} is not a DNS-1035 label (lowercase letters, digits, '-')")
    if args.runtime == "huggingface":
        return _hf_manifest(args)
    args.model = args.model or "alignpipe-policy-onnx"
    info = registry.model_version_by_alias(args.model, args.alias)
    if info is None and args.image is None:
        raise ConfigError("--model", f"no version of {args.model!r} carries alias {args.alias!r} (give --image)")
    version = info["version"] if info else None
    image = args.image or f"{args.registry.rstrip('/')}/{args.model}:v{version}"
    manifest = kserve_manifest(args.name or args.model, image, model_uri=f"models:/{args.model}@{args.alias}",
                               version=version, threads=args.threads, cpu=args.cpu, memory=args.memory,
                               gpu=args.gpu or 0)
    _write(args.out, manifest, f"{args.model} version {version}, image {image}", args.force)
    return 0


def _hf_manifest(args: argparse.Namespace) -> int:
    """The Hugging Face runtime's InferenceService of MODEL@ALIAS (default alignpipe-policy: the transformers
    flavor), storageUri its artifact location (or --storage-uri)."""
    from alignpipe.tracking import registry

    args.model = args.model or "alignpipe-policy"
    info = registry.model_version_by_alias(args.model, args.alias)
    if info is None:
        raise ConfigError("--model", f"no version of {args.model!r} carries alias {args.alias!r}")
    storage = args.storage_uri or registry.download_uri(args.model, info["version"])
    if not storage.startswith(STORAGE_SCHEMES):
        raise ConfigError("--storage-uri", f"{args.model} version {info['version']} is stored at {storage!r}, which "
                          f"a KServe pod cannot read (schemes: {', '.join(STORAGE_SCHEMES)}): use a tracking server "
                          "with object storage, or copy the model there and give --storage-uri")
    manifest = kserve_hf_manifest(args.name, storage, model_uri=f"models:/{args.model}@{args.alias}",
                                  version=info["version"], served_name=args.name, cpu=args.cpu, memory=args.memory,
                                  gpu=1 if args.gpu is None else args.gpu)
    _write(args.out, manifest, f"{args.model} version {info['version']} from {storage}, KServe Hugging Face runtime",
           args.force)
    return 0


def _write(out: str, manifest: dict[str, Any], what: str, force: bool = False) -> None:
    text = yaml.safe_dump(manifest, sort_keys=False)
    if out == "-":
        sys.stdout.write(text)
    else:
        write_output_file(out, text, force=force)  # a file alignpipe did not write is refused unless --force
        print(f"wrote {out} ({redact_text(what)})")


def _manifest_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alignpipe serve kserve-manifest",
                                description="KServe InferenceService YAML for MODEL@ALIAS")
    p.add_argument("--runtime", choices=("custom", "huggingface"), default="custom",
                   help="custom: the serving image (ONNX, CPU); huggingface: KServe's Hugging Face runtime with vLLM "
                   "(a chat champion on GPU nodes) (default: %(default)s)")
    p.add_argument("--model", help="registered model (default: alignpipe-policy-onnx; with --runtime huggingface "
                   "alignpipe-policy, the transformers flavor)")
    p.add_argument("--storage-uri", help="--runtime huggingface: where the pod reads the model (default: the "
                   "registered version's artifact location)")
    p.add_argument("--alias", default="champion", help="alias to serve (default: %(default)s)")
    p.add_argument("--name", default="alignpipe-policy", help="InferenceService name (default: %(default)s)")
    p.add_argument("--image", help="serving image (default: REGISTRY/MODEL:vVERSION)")
    p.add_argument("--registry", default="registry.example.internal/alignpipe",
                   help="image registry for the default image name (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads of each server worker (the server "
                   "starts one worker per CPU of the pod's limit; default: %(default)s)")
    p.add_argument("--cpu", default="2", help="CPU request and limit (default: %(default)s)")
    p.add_argument("--memory", default="2Gi", help="memory request and limit (default: %(default)s)")
    p.add_argument("--gpu", type=int, help="nvidia.com/gpu limit (default: 0; 1 with --runtime huggingface)")
    p.add_argument("--out", default="-", help="output file, - for stdout (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace --out even if alignpipe did not write it")
    return p


def _server_parser() -> argparse.ArgumentParser:
    from alignpipe.serving.openai_api import Limits

    d = Limits()
    p = argparse.ArgumentParser(prog="alignpipe serve MODEL_URI",
                                description="OpenAI-compatible server (continuous batching) of an ONNX policy")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--name", help="the model id clients send and /v1/models lists (default: the registered name, "
                   "or the folder's name)")
    p.add_argument("--reward", metavar="URI", help="reward serving model for /v1/score (default: "
                   "alignpipe-reward-onnx at the policy's alias, or the export folder's reward.onnx)")
    p.add_argument("--workers", type=int, default=0, help="server processes, each with its own decoder loop and "
                   "model copy, sharing the port (default: the CPUs this process may use)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads per worker (default: the "
                   "CPUs this process may use, divided among the workers)")
    p.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together (default: "
                   "%(default)s)")
    p.add_argument("--max-queue", type=int, default=256, help="sequences waiting to join the batch; more: 503 "
                   "(default: %(default)s)")
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds before a request is answered 504 "
                   "(default: %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="request body limit; larger: 413 "
                   "(default: %(default)s)")
    p.add_argument("--max-prompts", type=int, default=d.max_prompts, help="prompts per request (default: "
                   "%(default)s)")
    p.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars, help="characters per prompt "
                   "(default: %(default)s)")
    return p


SERVE_USAGE = """alignpipe serve MODEL_URI [--host H] [--port P] [...]   OpenAI-compatible server of an ONNX policy
                                                          (models:/alignpipe-policy-onnx@champion or an export
                                                          folder); `alignpipe serve MODEL_URI --help` for options
alignpipe serve kserve-manifest [...]                     KServe InferenceService YAML (--help for options)"""


def cmd_serve(args: argparse.Namespace) -> int:
    if args.target == "kserve-manifest":
        return cmd_kserve_manifest(_manifest_parser().parse_args(args.rest))
    opts = _server_parser().parse_args(args.rest)
    return run_server(args.target, opts)


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity, capped by the cgroup's CPU quota (a pod's CPU limit)."""
    import math
    import os

    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def run_server(uri: str, opts: argparse.Namespace) -> int:
    """Load MODEL_URI, start the decoder loop, serve until interrupted."""
    import os

    import uvicorn

    from alignpipe.serving.loading import resolve
    from alignpipe.serving.graph import serving_graph
    from alignpipe.serving.openai_api import (SPEC_ENV, Limits, build_server, create_app, freeze_heap,
                                              worker_spec)

    for flag, value, low in (("--port", opts.port, 0), ("--threads", opts.threads, 0), ("--workers", opts.workers, 0),
                             ("--max-batch-size", opts.max_batch_size, 1), ("--max-queue", opts.max_queue, 1),
                             ("--max-body-bytes", opts.max_body_bytes, 1), ("--max-prompts", opts.max_prompts, 1),
                             ("--max-prompt-chars", opts.max_prompt_chars, 1)):
        if value < low:
            raise ConfigError(flag, f"must be >= {low}, got {value}")
    if not 0 < opts.timeout <= 3600:
        raise ConfigError("--timeout", f"must be in (0, 3600] seconds, got {opts.timeout}")
    cpus = usable_cpus()
    workers = opts.workers or cpus
    threads = opts.threads or max(1, cpus // workers)
    served = resolve(uri, opts.reward)
    served.name = opts.name or served.name
    limits = Limits(max_body_bytes=opts.max_body_bytes, max_prompts=opts.max_prompts,
                    max_prompt_chars=opts.max_prompt_chars, timeout_s=opts.timeout)
    graph = serving_graph(served.policy_onnx, Path(served.workdir.name))
    server = build_server(served, threads, opts.max_batch_size, opts.max_queue, limits, graph)  # or fails here
    print(f"serving {served.name} ({served.task}, {served.policy_onnx.name}) on http://{opts.host}:{opts.port}/v1 "
          f"with {workers} worker(s) of {threads} onnxruntime thread(s); reward scoring: "
          f"{'POST /v1/score' if server.scorer else 'none (' + served.no_reward + ')'}", flush=True)
    run = {"host": opts.host, "port": opts.port, "log_level": "warning", "access_log": False}
    try:
        if workers == 1:
            app = create_app(server)
            freeze_heap()
            uvicorn.run(app, **run)
        else:  # each worker builds its own server from the files resolved here (kept until the workers end)
            server.engine.close()
            os.environ[SPEC_ENV] = worker_spec(served, graph, threads, opts.max_batch_size, opts.max_queue, limits)
            uvicorn.run("alignpipe.serving.openai_api:app_from_env", factory=True, workers=workers, **run)
    finally:
        server.engine.close()
    return 0


def add_serve_parser(sub) -> None:
    serve = sub.add_parser("serve", help="serving: an OpenAI-compatible server of the champion, or its KServe "
                           "manifest", usage=SERVE_USAGE, description=SERVE_USAGE,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("target", metavar="MODEL_URI|kserve-manifest",
                       help="models:/NAME@ALIAS or a local folder to serve, or kserve-manifest")
    serve.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)
