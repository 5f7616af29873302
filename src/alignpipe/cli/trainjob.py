"""Multi-node training: a Kubeflow Trainer `TrainJob` (or a legacy training-operator `PyTorchJob`) that runs one
training stage (pretrain, reward, dpo) with DDP on several nodes, generated from the same params as the CLI, DVC
and the pipeline.

The manifest is two documents for `kubectl apply -f`: a ConfigMap holding the stage's params section (checked by
its Config, `gpus` set to the world size, a relative checkpoint_dir moved onto the shared volume) and the job. Every
node runs the image pinned in components/image.py with
`torchrun -m alignpipe <stage> --params /etc/alignpipe/params.yaml --<input> /workspace/... --out /workspace/...`:
the torch-distributed runtime hands torchrun the node count, node rank and master address (PET_* variables); the
PyTorchJob passes the operator's MASTER_ADDR/RANK/WORLD_SIZE to torchrun explicitly. Inputs, outputs and
checkpoints live on one ReadWriteMany volume mounted at /workspace on every node, laid out like the DVC repo
(`data/`, `artifacts/<stage>/`); rank 0 alone writes the outputs and the MLflow run (alignpipe.run.runner).

`add_trainjob_parser(actions)` adds the `trainjob` command to `alignpipe pipeline`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from alignpipe.core.config import DEFAULT_PARAMS, apply_overrides, build_config, load_params
from alignpipe.core.errors import AlignpipeError, ConfigError
from alignpipe.core.outputs import write_output_file
from alignpipe.stages import MULTI_GPU

TRAINJOB_API = "trainer.kubeflow.org/v1alpha1"  # Kubeflow Trainer v2 (>= 2.2: runtimePatches)
PYTORCHJOB_API = "kubeflow.org/v1"  # Kubeflow training operator v1
RUNTIME = "torch-distributed"  # the ClusterTrainingRuntime Kubeflow Trainer installs for PyTorch
NODE = "node"  # that runtime's replicated job and container name
PATCH_MANAGER = "alignpipe"
PARAMS_DIR = "/etc/alignpipe"
PARAMS_FILE = f"{PARAMS_DIR}/params.yaml"
WORKSPACE = "/workspace"
MAX_NODES = 1024  # --nodes above this is a typo, not a cluster: refused before a manifest asks a scheduler for it
MAX_GPUS_PER_NODE = 64  # the largest nodes sold hold 8-16; a bound, not a fit
DEFAULT_PVC = "alignpipe-workspace"
KINDS = ("trainjob", "pytorchjob")


def stage_config(stage: str, params_path: str | Path, sets: list[str]):
    """The stage's Config from the params file with `sets` applied (ConfigErrors name the bad key)."""
    from alignpipe.stages import config_classes

    if stage not in MULTI_GPU:
        raise ConfigError(f"--stage {stage}", f"does not train under DDP; multi-node stages: {', '.join(MULTI_GPU)}")
    known = config_classes()
    return build_config(known[stage], apply_overrides(load_params(params_path, known), sets, known))


def configmap_params(cfg, world_size: int) -> dict[str, dict]:
    """`{stage: section}` for the ConfigMap: `gpus` = the world size (part of pretrain's checkpoint fingerprint
    and token budget), a relative checkpoint_dir moved under the shared volume (every rank reads it on resume)."""
    values = type(cfg).from_dict({**cfg.to_dict(), "gpus": world_size}).to_dict()
    if "checkpoint_dir" in values and not Path(values["checkpoint_dir"]).is_absolute():
        values["checkpoint_dir"] = f"{WORKSPACE}/{values['checkpoint_dir']}"
    return {cfg.section(): values}


def stage_inputs(stage: str, given: dict[str, str]) -> dict[str, str]:
    """Input name -> path on the shared volume: each input's default path (the DVC layout) under /workspace,
    replaced by `given` (relative paths are under /workspace; an empty path drops the input)."""
    from alignpipe.stages import load_stage

    specs = {spec.name: spec for spec in load_stage(stage).INPUTS}
    unknown = sorted(set(given) - set(specs))
    if unknown:
        raise ConfigError(f"--input {unknown[0]}", f"not an input of {stage}; inputs: {', '.join(specs)}")
    paths = {}
    for name, spec in specs.items():
        path = given.get(name, spec.default)
        if path and (".." in Path(path).parts or not path.isprintable()):
            raise ConfigError(f"--input {name}={path}", f"must be a path on the shared volume ({WORKSPACE}), without "
                              "'..' or control characters")
        if path:
            paths[name] = path if path.startswith("/") else f"{WORKSPACE}/{path}"
        elif spec.required:
            raise ConfigError(f"--input {name}", f"{stage} requires it ({spec.help})")
    return paths


def stage_args(stage: str, inputs: dict[str, str]) -> list[str]:
    """`-m alignpipe <stage> --params ... --<input> PATH ... --out PATH`: what torchrun starts on every node."""
    args = ["-m", "alignpipe", stage, "--params", PARAMS_FILE]
    for name, path in inputs.items():
        args += [f"--{name.replace('_', '-')}", path]
    return [*args, "--out", f"{WORKSPACE}/artifacts/{stage}"]


def _resources(stage: str, gpus_per_node: int) -> dict[str, dict[str, str]]:
    """Per node: the pipeline task's CPU/memory per GPU (pipelines/align.py) times the GPUs, and the GPUs."""
    from alignpipe.pipelines.align import GPU_RESOURCE, RESOURCES

    cpus, gib = (n * max(gpus_per_node, 1) for n in RESOURCES[stage])
    requests = {"cpu": str(cpus), "memory": f"{gib}Gi"}
    limits = {"memory": f"{gib}Gi"}
    if gpus_per_node:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(gpus_per_node)
    return {"requests": requests, "limits": limits}


def _env() -> list[dict[str, Any]]:
    """The MLflow secret's keys (optional, as on the pipeline's tasks) and the code/data versions for the tags."""
    from alignpipe.tracking import runs
    from alignpipe.pipelines.align import MLFLOW_SECRET, MLFLOW_SECRET_KEYS

    env = [{"name": key, "valueFrom": {"secretKeyRef": {"name": MLFLOW_SECRET, "key": key, "optional": True}}}
           for key in MLFLOW_SECRET_KEYS]
    return env + [{"name": "ALIGNPIPE_GIT_COMMIT", "value": runs.git_commit()},
                  {"name": "ALIGNPIPE_DATA_VERSION", "value": runs.data_version()}]


def _pod_parts(params_configmap: str, pvc: str, gpus_per_node: int) -> dict[str, Any]:
    """Volumes, mounts and GPU placement shared by both job kinds."""
    from alignpipe.pipelines.align import GPU_NODE_LABEL, GPU_RESOURCE

    volumes = [{"name": "params", "configMap": {"name": params_configmap}},
               {"name": "workspace", "persistentVolumeClaim": {"claimName": pvc}},
               {"name": "dshm", "emptyDir": {"medium": "Memory"}}]  # NCCL needs more than the default 64 MB /dev/shm
    mounts = [{"name": "params", "mountPath": PARAMS_DIR, "readOnly": True},
              {"name": "workspace", "mountPath": WORKSPACE},
              {"name": "dshm", "mountPath": "/dev/shm"}]
    placement: dict[str, Any] = {}
    if gpus_per_node:
        placement = {"nodeSelector": {GPU_NODE_LABEL[0]: GPU_NODE_LABEL[1]},
                     "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]}
    return {"volumes": volumes, "mounts": mounts, "placement": placement}


def _configmap(name: str, namespace: str | None, params: dict[str, dict]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(name, namespace),
            "data": {Path(PARAMS_FILE).name: yaml.safe_dump(params, sort_keys=False)}}


def _metadata(name: str, namespace: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/part-of": "alignpipe"}}
    if namespace:
        meta["namespace"] = namespace
    return meta


def trainjob(stage: str, params: dict[str, dict], inputs: dict[str, str], nodes: int, gpus_per_node: int,
             name: str, namespace: str | None = None, pvc: str = DEFAULT_PVC, runtime: str = RUNTIME,
             image: str | None = None) -> list[dict[str, Any]]:
    """[ConfigMap, TrainJob]: `nodes` x `gpus_per_node` processes (one per node on CPU nodes when 0)."""
    from alignpipe.components.image import GPU_IMAGE

    pod = _pod_parts(f"{name}-params", pvc, gpus_per_node)
    job = {
        "apiVersion": TRAINJOB_API,
        "kind": "TrainJob",
        "metadata": _metadata(name, namespace),
        "spec": {
            "runtimeRef": {"name": runtime, "apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime"},
            "trainer": {
                "image": image or GPU_IMAGE,
                "command": ["torchrun", *stage_args(stage, inputs)],
                "env": _env(),
                "numNodes": nodes,
                "numProcPerNode": max(gpus_per_node, 1),
                "resourcesPerNode": _resources(stage, gpus_per_node),
            },
            "runtimePatches": [{
                "manager": PATCH_MANAGER,
                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
                    "name": NODE,
                    "template": {"spec": {"template": {"spec": {
                        "volumes": pod["volumes"],
                        "containers": [{"name": NODE, "volumeMounts": pod["mounts"]}],
                        **pod["placement"],
                    }}}},
                }]}}},
            }],
        },
    }
    return [_configmap(f"{name}-params", namespace, params), job]


def pytorchjob(stage: str, params: dict[str, dict], inputs: dict[str, str], nodes: int, gpus_per_node: int,
               name: str, namespace: str | None = None, pvc: str = DEFAULT_PVC,
               image: str | None = None) -> list[dict[str, Any]]:
    """[ConfigMap, PyTorchJob] for clusters that still run the training operator: one Master and nodes - 1
    Workers; the operator sets MASTER_ADDR, MASTER_PORT, WORLD_SIZE (pods) and RANK (pod index), which the
    container command hands to torchrun (Kubernetes expands `$(VAR)`)."""
    from alignpipe.components.image import GPU_IMAGE

    pod = _pod_parts(f"{name}-params", pvc, gpus_per_node)
    command = ["torchrun", "--nnodes", "$(WORLD_SIZE)", "--node_rank", "$(RANK)", "--nproc_per_node",
               str(max(gpus_per_node, 1)), "--master_addr", "$(MASTER_ADDR)", "--master_port", "$(MASTER_PORT)",
               *stage_args(stage, inputs)]
    container = {"name": "pytorch", "image": image or GPU_IMAGE, "command": command, "env": _env(),
                 "resources": _resources(stage, gpus_per_node), "volumeMounts": pod["mounts"]}

    def replica(n: int) -> dict[str, Any]:
        return {"replicas": n, "restartPolicy": "Never",
                "template": {"spec": {"containers": [container], "volumes": pod["volumes"], **pod["placement"]}}}

    specs = {"Master": replica(1)}
    if nodes > 1:
        specs["Worker"] = replica(nodes - 1)
    job = {"apiVersion": PYTORCHJOB_API, "kind": "PyTorchJob", "metadata": _metadata(name, namespace),
           "spec": {"pytorchReplicaSpecs": specs}}
    return [_configmap(f"{name}-params", namespace, params), job]


class _Dumper(yaml.SafeDumper):
    """Readable manifests: multi-line strings (the ConfigMap's params.yaml) as literal blocks, no YAML anchors
    for the parts the Master and Worker pods share."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_representer(str, lambda dumper, s: dumper.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def write_manifest(docs: list[dict[str, Any]], out: str | Path, force: bool = False) -> Path:
    """The documents as one multi-document YAML file."""
    return write_output_file(out, yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False), force=force)


# ---------------------------------------------------------------------------------------------- command


def add_trainjob_parser(actions) -> argparse.ArgumentParser:
    """Add `trainjob` to the `alignpipe pipeline` subcommands (`actions`: its add_subparsers object)."""
    p = actions.add_parser("trainjob", help="write a multi-node TrainJob (or PyTorchJob) manifest for one "
                           "training stage", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, choices=MULTI_GPU, help="the stage to train")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default: %(default)s)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs, hence torchrun processes, per node (default: the stage's `gpus`; 0: CPU nodes, "
                        "one process each)")
    p.add_argument("--params", default=DEFAULT_PARAMS, help="params YAML file (default: %(default)s)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one params value (repeatable)")
    p.add_argument("--input", dest="inputs", action="append", default=[], metavar="NAME=PATH",
                   help="an input's path on the shared volume (relative: under /workspace; default: the DVC "
                        "layout, e.g. data, artifacts/pretrain); NAME= drops an optional input; repeatable")
    p.add_argument("--kind", choices=KINDS, default="trainjob",
                   help="trainjob: Kubeflow Trainer v2 (default); pytorchjob: the legacy training operator")
    p.add_argument("--name", help="job name (default: alignpipe-<stage>)")
    p.add_argument("--namespace", help="Kubernetes namespace (default: kubectl's)")
    p.add_argument("--pvc", default=DEFAULT_PVC,
                   help="ReadWriteMany PersistentVolumeClaim mounted at /workspace (default: %(default)s)")
    p.add_argument("--runtime", default=RUNTIME, help="TrainJob ClusterTrainingRuntime (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="FILE.yaml", help="the manifest to write")
    p.add_argument("--force", action="store_true", help="replace --out even if alignpipe did not write it")
    p.set_defaults(func=cmd_trainjob)
    return p


def manifests(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The manifest documents for parsed `trainjob` arguments (ConfigErrors name the bad argument)."""
    if not 1 <= args.nodes <= MAX_NODES:
        raise ConfigError("--nodes", f"must be in [1, {MAX_NODES}], got {args.nodes}")
    cfg = stage_config(args.stage, args.params, args.sets)
    gpus = cfg.gpus if args.gpus_per_node is None else args.gpus_per_node
    if not 0 <= gpus <= MAX_GPUS_PER_NODE:
        raise ConfigError("--gpus-per-node", f"must be in [0, {MAX_GPUS_PER_NODE}] (0: CPU nodes), got {gpus}")
    name = args.name or f"alignpipe-{args.stage}"
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63 - len("-params"):
        raise ConfigError(f"--name {name}", "must be a lowercase DNS label (a-z, 0-9, '-'; starts with a letter) "
                                            "of at most 56 characters")
    given = {}
    for item in args.inputs:
        key, sep, path = item.partition("=")
        if not sep:
            raise ConfigError(item, "--input expects NAME=PATH")
        given[key.replace("-", "_")] = path
    params = configmap_params(cfg, args.nodes * max(gpus, 1))
    inputs = stage_inputs(args.stage, given)
    if args.kind == "pytorchjob":
        return pytorchjob(args.stage, params, inputs, args.nodes, gpus, name, args.namespace, args.pvc)
    return trainjob(args.stage, params, inputs, args.nodes, gpus, name, args.namespace, args.pvc, args.runtime)


def cmd_trainjob(args: argparse.Namespace) -> int:
    docs = manifests(args)
    out = write_manifest(docs, args.out, force=args.force)
    job = docs[-1]
    if job["kind"] == "TrainJob":
        trainer = job["spec"]["trainer"]
        nodes, procs, image, command = (trainer["numNodes"], trainer["numProcPerNode"], trainer["image"],
                                        trainer["command"])
    else:
        container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
        nodes = sum(r["replicas"] for r in job["spec"]["pytorchReplicaSpecs"].values())
        procs = int(container["command"][container["command"].index("--nproc_per_node") + 1])
        image, command = container["image"], container["command"]
    print(f"{job['kind']} {job['metadata']['name']}: {nodes} node(s) x {procs} process(es) = {nodes * procs}, "
          f"image {image}\n  {' '.join(command)}")
    print(f"\nwrote {out} (ConfigMap {docs[0]['metadata']['name']} + {job['kind']}): kubectl apply -f {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m alignpipe.cli.trainjob trainjob ...` (the same command as `alignpipe pipeline trainjob`)."""
    parser = argparse.ArgumentParser(prog="python -m alignpipe.cli.trainjob")
    add_trainjob_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except AlignpipeError as e:
        print(f"alignpipe trainjob: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
