"""Scale-out: pretrain under torchrun with 2 CPU processes (gloo) trains like 1 process at the same global batch;
only rank 0 records and publishes; the compiled pipeline asks for the GPUs and starts torchrun; the multi-node
TrainJob / PyTorchJob manifests carry the pinned image, a command the CLI accepts, and the resources; the
accelerate configs load and FSDP's resolves to the plugin we mean."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from alignpipe.run import runner
from alignpipe.cli import trainjob as scaleout
from alignpipe.tracking import runs
from alignpipe.core import distributed
from alignpipe.cli.main import build_parser
from alignpipe.core.config import StageConfig, field
from alignpipe.stages import Input

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
ACCELERATE = ROOT / "configs" / "accelerate"
BIN = Path(sys.executable).parent
# 1 process with batch 4 vs 2 processes with batch 2 each: same data, seed and global batch, fp32. The logged loss
# is the global batch's mean in both; the only difference is float summation order (the gradient all-reduce),
# measured at <= 1e-7 relative over 6 steps. 1e-4 is loose for that, tight for any real difference: logging rank
# 0's half-batch loss instead of the global mean is off by ~1e-3 already at step 1.
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-4


def _runs(db: Path) -> list[dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return [{"params": r.data.params,
             "loss": [m.value for m in sorted(client.get_metric_history(r.info.run_id, "train/loss"),
                                              key=lambda m: m.step)]} for r in runs]


@pytest.mark.slow
def test_two_cpu_processes_train_like_one_at_the_same_global_batch(tmp_path, tiny_data):
    """Acceptance: `torchrun --nproc_per_node 2` (gloo) at batch 2 per process vs 1 process at batch 4."""
    from safetensors.torch import load_file

    common = ["--params", str(TINY), "--data", str(tiny_data), "--set", "pretrain.precision=fp32",
              "--set", "pretrain.max_steps=6", "--set", "pretrain.logging_steps=1",
              "--set", "pretrain.n_eval_prompts=1",
              "--set", "pretrain.eval_val_chars=200", "--set", "pretrain.sampling.max_new_tokens=4"]
    launches = {
        1: [str(BIN / "python"), "-m", "alignpipe", "pretrain", *common, "--set", "pretrain.batch_size=4"],
        2: [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "alignpipe", "pretrain", *common,
            "--set", "pretrain.batch_size=2"],
    }
    _launch_both(tmp_path, launches, "pretrain")  # both at once: the test takes one run's time

    runs = {n: _runs(tmp_path / f"mlflow-{n}.db") for n in launches}
    assert [len(r) for r in runs.values()] == [1, 1]  # rank 1 opened no MLflow run
    one, two = runs[1][0], runs[2][0]
    assert len(one["loss"]) == len(two["loss"]) == 6
    for step, (a, b) in enumerate(zip(one["loss"], two["loss"]), 1):
        assert abs(a - b) <= LOSS_RTOL * abs(a), f"step {step}: 1 process {a}, 2 processes {b}"
    assert one["loss"][-1] < one["loss"][0]  # it trained

    m1, m2 = (json.loads((tmp_path / f"out-{n}" / "metrics.json").read_text()) for n in launches)
    assert m1["train_tokens"] == m2["train_tokens"]  # the same global batch
    assert abs(m1["final_train_loss"] - m2["final_train_loss"]) <= LOSS_RTOL * m1["final_train_loss"]
    w1, w2 = (load_file(tmp_path / f"out-{n}" / "model.safetensors") for n in launches)
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < WEIGHT_ATOL
    assert not list((tmp_path / "tmp").glob("alignpipe-pretrain-rank*"))  # rank 1's throwaway folder is gone
    assert not list(tmp_path.glob(".out-*.partial"))


@pytest.mark.slow
def test_dpo_under_torchrun_trains_like_one_process(tmp_path, tiny_data):
    """DPO (TRL) runs unchanged under torchrun: 2 processes at batch 2 log the losses of 1 process at batch 4 (the
    same pairs: the subset scales with the world size); the precomputed reference log-probabilities are shared
    between ranks; rank 0 alone evaluates, records and publishes."""
    import tiny

    policy = tiny.make_policy(tmp_path / "policy", conditional=True)
    prefs = tiny.make_prefs(tmp_path / "label" / "prefs.jsonl", n=24)
    common = ["--params", str(TINY), "--data", str(tiny_data), "--policy", str(policy), "--prefs", str(prefs),
              "--set", "dpo.max_steps=3", "--set", "dpo.logging_steps=1", "--set", "dpo.save_steps=100",
              "--set", "dpo.n_eval_prompts=4", "--set", "dpo.sampling.batch_size=4", "--set", "dpo.learning_rate=1e-3",
              "--set", "dpo.eval_heldout=true",
              "--set", "dpo.warmup_steps=0", "--set", "dpo.group_by_length=false"]
    m1, m2 = _trl_one_vs_two_processes(tmp_path, "dpo", common, global_batch=4, steps=3)
    assert m1["n_pairs"] == m2["n_pairs"] == 12  # batch_size * world size * max_steps
    assert abs(m1["kl_to_ref"] - m2["kl_to_ref"]) <= 1e-3 + 0.05 * abs(m1["kl_to_ref"])
    assert not list(tmp_path.glob(".out-*.partial"))


@pytest.mark.slow
def test_reward_under_torchrun_trains_like_one_process(tmp_path):
    """TRL's RewardTrainer under torchrun: 2 processes at batch 4 log the losses of 1 process at batch 8."""
    import tiny

    policy = tiny.make_policy(tmp_path / "policy")
    prefs = tiny.make_prefs(tmp_path / "label" / "prefs.jsonl", n=32)
    heldout = [{"prompt": f"def g{i}(a, b):", "chosen": f"\n    return a + b * {i}",
                "rejected": f"\n    return a+b *{i}"} for i in range(8)]
    (tmp_path / "label" / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout))
    common = ["--params", str(TINY), "--policy", str(policy), "--prefs", str(prefs.parent),
              "--set", "reward.max_steps=3", "--set", "reward.learning_rate=3e-3", "--set", "reward.warmup_ratio=0",
              "--set", "reward.prompt_lines=1", "--set", "reward.logging_steps=1"]
    m1, m2 = _trl_one_vs_two_processes(tmp_path, "reward", common, global_batch=8, steps=3)
    assert m1["train_steps"] == m2["train_steps"] == 3
    assert abs(m1["heldout_accuracy"] - m2["heldout_accuracy"]) <= 1 / 8  # one pair of 8 may flip


def _trl_one_vs_two_processes(tmp_path: Path, stage: str, common: list[str], global_batch: int,
                              steps: int) -> tuple[dict, dict]:
    """`stage` (a TRL trainer) as 1 process at `global_batch` and as torchrun 2 processes at half of it: one
    MLflow run each (rank 1 opens none), the same logged loss at every step; returns both metrics.json."""
    launches = {
        1: [str(BIN / "python"), "-m", "alignpipe", stage, *common, "--set", f"{stage}.batch_size={global_batch}"],
        2: [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "alignpipe", stage, *common,
            "--set", f"{stage}.batch_size={global_batch // 2}"],
    }
    logs = _launch_both(tmp_path, launches, stage)
    runs = {n: _runs(tmp_path / f"mlflow-{n}.db") for n in launches}
    assert [len(r) for r in runs.values()] == [1, 1], logs[2][-2000:]
    one, two = runs[1][0]["loss"], runs[2][0]["loss"]
    print(f"{stage} loss per step, 1 process: {one}; 2 processes: {two}")
    assert len(one) == len(two) == steps
    for step, (a, b) in enumerate(zip(one, two), 1):
        assert abs(a - b) <= 1e-3 * abs(a), f"step {step}: 1 process {a}, 2 processes {b}"
    return tuple(json.loads((tmp_path / f"out-{n}" / "metrics.json").read_text()) for n in launches)


def _launch_both(tmp_path: Path, launches: dict[int, list[str]], stage: str) -> dict[int, str]:
    """Run the 1-process and the torchrun launch at once (own MLflow store, checkpoints and output each)."""
    procs = {}
    for n, cmd in launches.items():
        db = tmp_path / f"mlflow-{n}.db"
        shutil.copy(tmp_path / "mlflow.db", db)  # the migrated empty store conftest made
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
        cmd = [*cmd, "--set", f"{stage}.checkpoint_dir={tmp_path / f'ckpt-{n}'}", "--out", str(tmp_path / f"out-{n}")]
        procs[n] = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
    logs = {}
    for n, proc in procs.items():
        logs[n] = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, logs[n][-3000:]
    return logs


# ---------------------------------------------------------------------------------------------- rank 0 only


@dataclass(frozen=True)
class _Cfg(StageConfig):
    SECTION: ClassVar[str] = "fake"
    lr: float = field(0.1, "a param")


@pytest.fixture
def fake_stage(monkeypatch):
    seen: list[Path] = []

    def run(cfg, inputs, out_dir):
        seen.append(out_dir)
        (out_dir / "model.safetensors").write_bytes(b"weights")
        runs.log_metrics({"train/loss": 1.5}, step=1)
        return {"score": 0.25}

    stage = types.SimpleNamespace(Config=_Cfg, INPUTS=(Input("data", "data", "the data"),), METRICS=("score",),
                                  run=run)
    monkeypatch.setattr(runner, "load_stage", lambda name: stage)
    return seen


def test_other_ranks_run_the_stage_but_record_and_publish_nothing(tmp_path, fake_stage, monkeypatch):
    (tmp_path / "data").mkdir()
    out = tmp_path / "artifacts" / "fake"
    monkeypatch.setenv("RANK", "1")
    assert not distributed.is_main_process()
    metrics = runner.execute("fake", _Cfg(), {"data": tmp_path / "data"}, out)
    assert metrics == {"score": 0.25}  # the stage ran (its collectives need every rank)
    assert not out.exists() and not out.with_name(".fake.partial").exists()
    assert fake_stage[0].name.startswith("alignpipe-fake-rank1-") and not fake_stage[0].exists()  # thrown away
    assert _runs(tmp_path / "mlflow.db") == []

    monkeypatch.setenv("RANK", "0")
    metrics = runner.execute("fake", _Cfg(), {"data": tmp_path / "data"}, out)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert [r["loss"] for r in _runs(tmp_path / "mlflow.db")] == [[1.5]]


def test_other_ranks_open_no_mlflow_run(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    with runs.stage_run("fake", {"lr": 0.1}) as run_id:
        runs.log_metrics({"x": 1.0})
    assert run_id == "" and _runs(tmp_path / "mlflow.db") == []


# ---------------------------------------------------------------------------------------------- KFP


def test_compiled_pipeline_requests_4_gpus_and_starts_torchrun_for_pretrain(tmp_path):
    """Acceptance: `pipeline compile --set pretrain.gpus=4` -> 4 x nvidia.com/gpu and torchrun for that task."""
    from alignpipe.cli.main import main
    from alignpipe.components.image import GPU_IMAGE

    out = tmp_path / "pipeline.yaml"
    assert main(["pipeline", "compile", "--params", str(TINY), "--set", "pretrain.gpus=4", "--out", str(out)]) == 0
    spec, platform = yaml.safe_load_all(out.read_text())
    tasks = spec["root"]["dag"]["tasks"]

    def executor(task: str) -> tuple[dict, str]:
        label = spec["components"][tasks[task]["componentRef"]["name"]]["executorLabel"]
        return spec["deploymentSpec"]["executors"][label]["container"], label

    container, label = executor("pretrain")
    assert container["image"] == GPU_IMAGE
    assert container["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert int(container["resources"]["accelerator"]["resourceCount"]) == 4
    launcher = tasks["pretrain"]["inputs"]["parameters"]["launcher"]["runtimeValue"]["constant"]
    assert launcher == ["torchrun", "--standalone", "--nproc_per_node", "4", "-m", "alignpipe"]
    node = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][label]
    assert node["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    # the other training tasks keep one GPU, in process
    reward, _ = executor("reward")
    assert int(reward["resources"]["accelerator"]["resourceCount"]) == 1
    assert tasks["reward"]["inputs"]["parameters"]["launcher"]["runtimeValue"]["constant"] == []


# ---------------------------------------------------------------------------------------------- multi-node


def _manifest(tmp_path, *argv: str) -> tuple[dict, dict]:
    out = tmp_path / "job.yaml"
    assert scaleout.main(["trainjob", "--params", str(TINY), "--out", str(out), *argv]) == 0
    configmap, job = yaml.safe_load_all(out.read_text())
    return configmap, job


def _cli_args(command: list[str]):
    """The stage arguments of a torchrun command (after `-m alignpipe`), parsed by the real CLI."""
    rest = command[command.index("-m") + 2:]
    return build_parser(rest[0]).parse_args(rest)


def test_trainjob_manifest_from_the_same_config(tmp_path):
    from alignpipe.components.image import GPU_IMAGE

    from alignpipe.stages import pretrain

    configmap, job = _manifest(tmp_path, "--stage", "pretrain", "--nodes", "2", "--gpus-per-node", "4",
                               "--set", "pretrain.max_steps=50", "--namespace", "ml")
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["metadata"] == {"name": "alignpipe-pretrain", "namespace": "ml",
                               "labels": {"app.kubernetes.io/part-of": "alignpipe"}}
    spec = job["spec"]
    assert spec["runtimeRef"]["name"] == "torch-distributed"
    trainer = spec["trainer"]
    assert trainer["image"] == GPU_IMAGE
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 4
    res = trainer["resourcesPerNode"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "4"
    assert res["requests"]["cpu"] == "32" and res["limits"]["memory"] == "128Gi"  # pipelines/align.py x 4 GPUs
    assert trainer["command"][:3] == ["torchrun", "-m", "alignpipe"]  # the runtime supplies nnodes/rank (PET_*)
    args = _cli_args(trainer["command"])
    assert (args.stage, args.params, args.input_data, args.out) == (
        "pretrain", "/etc/alignpipe/params.yaml", "/workspace/data", "/workspace/artifacts/pretrain")
    env = {e["name"]: e for e in trainer["env"]}
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"]["name"] == "alignpipe-mlflow"

    assert configmap["kind"] == "ConfigMap" and configmap["metadata"]["name"] == "alignpipe-pretrain-params"
    params = yaml.safe_load(configmap["data"]["params.yaml"])
    cfg = pretrain.Config.from_dict(params["pretrain"])  # the CLI in the pod accepts it
    assert cfg.max_steps == 50 and cfg.n_embd == 32  # tiny.yaml plus --set
    assert cfg.gpus == 8 and cfg.checkpoint_dir == "/workspace/checkpoints/pretrain"

    pod = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert pod["name"] == "node"
    pod = pod["template"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["params"]["configMap"]["name"] == "alignpipe-pretrain-params"
    assert volumes["workspace"]["persistentVolumeClaim"]["claimName"] == "alignpipe-workspace"
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert pod["containers"][0]["name"] == "node"
    assert mounts["/etc/alignpipe"] == "params" and mounts["/workspace"] == "workspace"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


def test_pytorchjob_manifest_for_the_training_operator(tmp_path):
    from alignpipe.components.image import GPU_IMAGE

    configmap, job = _manifest(tmp_path, "--stage", "dpo", "--kind", "pytorchjob", "--nodes", "3",
                               "--gpus-per-node", "2", "--input", "human_prefs=human/prefs.jsonl")
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    for replica in replicas.values():
        container = replica["template"]["spec"]["containers"][0]
        assert container["name"] == "pytorch" and container["image"] == GPU_IMAGE
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
        cmd = container["command"]
        assert cmd[0] == "torchrun" and cmd[cmd.index("--nproc_per_node") + 1] == "2"
        assert cmd[cmd.index("--node_rank") + 1] == "$(RANK)" and cmd[cmd.index("--nnodes") + 1] == "$(WORLD_SIZE)"
        args = _cli_args(cmd)
        assert (args.input_policy, args.input_prefs, args.input_human_prefs) == (
            "/workspace/artifacts/pretrain", "/workspace/artifacts/label", "/workspace/human/prefs.jsonl")
    assert yaml.safe_load(configmap["data"]["params.yaml"])["dpo"]["gpus"] == 6


@pytest.mark.parametrize("argv, message", [
    (["--stage", "pretrain", "--nodes", "0"], "--nodes: must be in [1, 1024]"),
    (["--stage", "pretrain", "--nodes", "1000000"], "--nodes: must be in [1, 1024]"),
    (["--stage", "pretrain", "--input", "data=../../../etc"], "without '..'"),
    (["--stage", "pretrain", "--set", "pretrain.bogus=1"], "pretrain.bogus: unknown key"),
    (["--stage", "pretrain", "--name", "Bad_Name"], "must be a lowercase DNS label"),
    (["--stage", "reward", "--input", "data=x"], "--input data: not an input of reward"),
    (["--stage", "dpo", "--input", "policy="], "--input policy: dpo requires it"),
])
def test_bad_trainjob_arguments_are_one_line_errors(argv, message, tmp_path, capsys):
    assert scaleout.main(["trainjob", "--params", str(TINY), "--out", str(tmp_path / "x.yaml"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.yaml").exists()


def test_ppo_is_not_a_multi_node_stage(tmp_path):
    with pytest.raises(SystemExit):
        scaleout.main(["trainjob", "--stage", "ppo", "--out", str(tmp_path / "x.yaml")])


# ---------------------------------------------------------------------------------------------- accelerate


def _launch_env(config: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file CONFIG --num_processes 2` gives each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "--num_processes", "2", "x.py"])
    args, _, _ = _validate_launch_command(args)
    before = dict(os.environ)
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if before.get(k) != v}


def test_accelerate_configs_load_and_fsdp_resolves_to_sharded_gpt2_blocks(monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers.models.gpt2 import modeling_gpt2

    kinds = {name: load_config_from_file(str(ACCELERATE / f"{name}.yaml")).distributed_type.name
             for name in ("ddp", "fsdp", "deepspeed_zero3")}
    assert kinds == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero3": "DEEPSPEED"}
    assert load_config_from_file(str(ACCELERATE / "deepspeed_zero3.yaml")).deepspeed_config["zero_stage"] == 3

    assert "ACCELERATE_USE_FSDP" not in _launch_env(ACCELERATE / "ddp.yaml")
    env = _launch_env(ACCELERATE / "fsdp.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # what the Trainer's Accelerator builds from that environment
    assert plugin.transformer_cls_names_to_wrap == ["GPT2Block"] and hasattr(modeling_gpt2, "GPT2Block")
    assert plugin.reshard_after_forward is True and plugin.state_dict_type.name == "FULL_STATE_DICT"
