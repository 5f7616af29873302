"""The reward stage: training changes the weights and learns separable pairs; the saved model loads with the Auto
classes and scores as `alignpipe.lm.reward_model` formats text, which is exactly how RewardTrainer tokenizes; drops,
LoRA, resume and the calibration check."""

from __future__ import annotations

import json
import math

import pytest

from tiny import make_policy, make_prefs, make_tokenizer

from alignpipe.core.errors import ConfigError, DataError
from alignpipe.oracle.judges import Pair, RewardModelJudge
from alignpipe.lm.reward_model import reward_ids, reward_text
from alignpipe.stages import reward

CLEAN, DIRTY = "\n    return a + b * 7", "\n    return a+b *7"


pytestmark = pytest.mark.usefixtures("module_mlflow")  # one MLflow store per module (conftest)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny reward model trained by the stage (through the runner) on separable pairs."""
    from alignpipe.run.runner import execute

    root = tmp_path_factory.mktemp("reward")
    (root / "label").mkdir()
    make_prefs(root / "label" / "prefs.jsonl", n=32)
    heldout = [{"prompt": f"def g{i}(a, b):", "chosen": f"\n    return a + b * {i}",
                "rejected": f"\n    return a+b *{i}"} for i in range(100, 108)]
    (root / "label" / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout))
    policy = make_policy(root / "policy")
    cfg = reward.Config(max_steps=20, batch_size=8, learning_rate=3e-3, warmup_ratio=0.0, save_steps=0,
                        prompt_lines=1, checkpoint_dir=str(root / "ckpt"))
    metrics = execute("reward", cfg, {"prefs": root / "label", "policy": policy}, root / "out")
    return {"root": root, "policy": policy, "out": root / "out", "metrics": metrics}


@pytest.mark.slow
def test_training_changes_weights_and_learns_separable_pairs(trained):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignpipe.lm.reward_model import reward_scores

    metrics = trained["metrics"]
    assert metrics["heldout_accuracy"] == 1.0 and metrics["mean_margin"] > 0
    assert metrics["n_dropped_too_long"] == 0 and metrics["train_steps"] == 20 and metrics["seconds"] > 0
    assert json.loads((trained["out"] / "metrics.json").read_text())["heldout_accuracy"] == 1.0

    before, after = load_file(trained["policy"] / "model.safetensors"), load_file(trained["out"] / "model.safetensors")
    body = [k for k in after if k.startswith("transformer.h.")]
    assert body and any(not torch.equal(after[k], before[k]) for k in body)  # the LM body was fine-tuned
    assert "score.weight" in after and "lm_head.weight" not in after

    model = AutoModelForSequenceClassification.from_pretrained(trained["out"]).eval()
    tok = AutoTokenizer.from_pretrained(trained["out"])
    prompts = [f"def h{i}(x, y):" for i in range(5)]
    good = reward_scores(model, tok, prompts, [f"\n    return x + y * {i}" for i in range(5)])
    bad = reward_scores(model, tok, prompts, [f"\n    return x+y *{i}" for i in range(5)])
    assert all(g > b for g, b in zip(good, bad))
    assert model.config.alignpipe_prompt_lines == 1  # saved with the model: scoring reads the last prompt line
    assert reward_scores(model, tok, ["import os\n" + prompts[0]], [CLEAN]) == reward_scores(model, tok, prompts[:1],
                                                                                             [CLEAN])

    (sa, sb), = RewardModelJudge(str(trained["out"])).score([Pair("def f(a, b):", CLEAN, DIRTY)])
    assert sa > sb  # the reward_model judge picks the clean line
    calib = json.loads((trained["out"] / "calibration.json").read_text())
    assert sum(b["n"] for b in calib["buckets"]) == 8


@pytest.mark.slow
def test_rerun_gives_the_same_bytes_whatever_thread_count_the_process_inherited(trained, monkeypatch):
    """The runner pins torch's thread count (`core.determinism`): a rerun from a process whose threads were set
    otherwise (OMP_NUM_THREADS, taskset, torchrun) writes the same model bytes; ALIGNPIPE_THREADS chooses the count."""
    import torch

    from alignpipe.core import determinism
    from alignpipe.run.runner import execute

    monkeypatch.delenv(determinism.THREADS_ENV, raising=False)
    root, before = trained["root"], torch.get_num_threads()
    cfg = reward.Config(max_steps=20, batch_size=8, learning_rate=3e-3, warmup_ratio=0.0, save_steps=0,
                        prompt_lines=1, checkpoint_dir=str(root / "ckpt"))
    inputs = {"prefs": root / "label", "policy": trained["policy"]}
    try:
        torch.set_num_threads(1 if determinism.machine_threads() > 1 else 2)
        execute("reward", cfg, inputs, root / "rerun")
        for name in ("model.safetensors", "heldout_scores.jsonl", "calibration.json", "reward.json"):
            assert (root / "rerun" / name).read_bytes() == (trained["out"] / name).read_bytes(), name
        assert torch.get_num_threads() == determinism.machine_threads()
        monkeypatch.setenv(determinism.THREADS_ENV, "1")
        assert determinism.pin()["alignpipe.torch_threads"] == "1" and torch.get_num_threads() == 1
        monkeypatch.setenv(determinism.THREADS_ENV, "two")
        with pytest.raises(ConfigError, match="ALIGNPIPE_THREADS: must be a whole number >= 1, got .two."):
            determinism.threads()
    finally:
        torch.set_num_threads(before)


def test_reward_text_is_what_reward_trainer_trains_on(tmp_path):
    tok = make_tokenizer()
    assert reward_text("x = 1", "\ny = 2", tok) == "x = 1\ny = 2<|endoftext|>"
    assert reward_text("x = 1", "\ny = 2<|endoftext|>", tok) == "x = 1\ny = 2<|endoftext|>"  # EOS once
    model, tok = reward.load_model(str(make_policy(tmp_path / "policy", tok=tok)), reward.Config())
    rows = [{"prompt": "def f(a, b):", "chosen": "\n    return a + b", "rejected": "\n    return a+b"},
            {"prompt": "x = [1, 2, 3]\n" * 40, "chosen": "\ny = 2", "rejected": "\ny=2"}]
    cfg = reward.Config(max_length=64, prompt_lines=0, save_steps=0, checkpoint_dir=str(tmp_path / "ckpt"))
    trainer = reward.build_trainer(cfg, model, tok, rows)
    assert len(reward_ids(rows[1]["prompt"], rows[1]["chosen"], tok)) > 64
    assert len(trainer.train_dataset) == 1  # the long pair is dropped, not truncated
    example = trainer.train_dataset[0]
    assert example["chosen_ids"] == reward_ids(rows[0]["prompt"], rows[0]["chosen"], tok)
    assert example["rejected_ids"] == reward_ids(rows[0]["prompt"], rows[0]["rejected"], tok)

    cfg = reward.Config(max_length=64, prompt_lines=2, save_steps=0, checkpoint_dir=str(tmp_path / "c"))
    trainer = reward.build_trainer(cfg, model, tok, rows)
    assert len(trainer.train_dataset) == 2  # the last 2 lines of the long prompt fit
    assert trainer.train_dataset[1]["chosen_ids"] == reward_ids(rows[1]["prompt"], rows[1]["chosen"], tok, 2)
    assert reward_text("a\nb\nc", "\nd", tok, 2) == "b\nc\nd<|endoftext|>"


@pytest.mark.slow
def test_lora_resume_and_drop_count(tmp_path):
    from alignpipe.run.runner import execute
    from transformers import AutoModelForSequenceClassification

    prefs = make_prefs(tmp_path / "prefs.jsonl", n=20)
    rows = [json.loads(line) for line in prefs.read_text().splitlines()]
    rows[0]["prompt"] = "x = [1, 2, 3]\n" * 40 + rows[0]["prompt"]  # longer than max_length: dropped, counted
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    policy = make_policy(tmp_path / "policy")
    common = dict(lora_r=4, lora_alpha=8, batch_size=4, prompt_lines=0, save_steps=2, max_length=128,
                  heldout_frac=0.25, checkpoint_dir=str(tmp_path / "ckpt"), learning_rate=1e-3)
    first = execute("reward", reward.Config(max_steps=2, **common), {"prefs": prefs, "policy": policy},
                    tmp_path / "a")
    assert first["n_dropped_too_long"] == 1 and first["train_steps"] == 2
    second = execute("reward", reward.Config(max_steps=4, resume=True, **common), {"prefs": prefs, "policy": policy},
                     tmp_path / "b")
    assert second["train_steps"] == 4
    assert json.loads((tmp_path / "b" / "reward.json").read_text())["resumed_from"].endswith("checkpoint-2")
    assert not list((tmp_path / "b").glob("adapter_*"))  # LoRA merged: a plain model directory
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "b")
    assert model.config.num_labels == 1 and not hasattr(model, "peft_config")
    assert first["n_changed_tensors"] > 0


@pytest.mark.slow
def test_resume_falls_back_past_a_corrupt_checkpoint_and_matches_an_uninterrupted_run(tmp_path, capfd):
    """A kill during a save leaves the newest checkpoint truncated or without trainer_state.json: --resume says so
    in one line, resumes from the one before and ends where an uninterrupted run ends (train_loss included, with
    checkpoints that do not fall on logging steps)."""
    from alignpipe.run.runner import execute

    prefs = make_prefs(tmp_path / "prefs.jsonl", n=40)
    policy = make_policy(tmp_path / "policy")
    inputs = {"prefs": prefs, "policy": policy}
    cfg = reward.Config(max_steps=6, batch_size=4, save_steps=2, logging_steps=3, prompt_lines=1,
                        checkpoint_dir=str(tmp_path / "ckpt"))
    full = execute("reward", cfg, inputs, tmp_path / "full")
    newest = tmp_path / "ckpt" / "checkpoint-6" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])
    capfd.readouterr()
    resumed = execute("reward", reward.Config(**{**cfg.to_dict(), "resume": True}), inputs, tmp_path / "resumed")
    assert "reward: resume: skipping" in capfd.readouterr().err
    assert json.loads((tmp_path / "resumed" / "reward.json").read_text())["resumed_from"].endswith("checkpoint-4")
    for key in ("train_loss", "train_steps", "heldout_accuracy", "mean_margin", "calibration_ece"):
        assert resumed[key] == pytest.approx(full[key], rel=1e-6, abs=1e-9), key

    (tmp_path / "ckpt" / "checkpoint-6" / "trainer_state.json").unlink()  # killed before the state was written
    again = execute("reward", reward.Config(**{**cfg.to_dict(), "resume": True}), inputs, tmp_path / "again")
    err = capfd.readouterr().err
    assert "checkpoint-6: trainer_state.json is missing" in err and "Traceback" not in err
    assert again["mean_margin"] == pytest.approx(full["mean_margin"], rel=1e-6)
    # Killed after the last checkpoint (evaluating, publishing): the resume restores it and trains no extra step.
    final = execute("reward", reward.Config(**{**cfg.to_dict(), "resume": True}), inputs, tmp_path / "final")
    assert final["train_steps"] == 6
    for key in ("train_loss", "mean_margin", "calibration_ece"):
        assert final[key] == pytest.approx(full[key], rel=1e-6, abs=1e-9), key

    for ckpt in (tmp_path / "ckpt").glob("checkpoint-*"):
        (ckpt / "trainer_state.json").write_text("{")
    with pytest.raises(DataError, match="none of the 2 checkpoints is complete"):
        execute("reward", reward.Config(**{**cfg.to_dict(), "resume": True}), inputs, tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_calibration_buckets_and_ece():
    buckets, ece = reward.calibration([0.1, -0.2, 3.0, 4.0], n_buckets=2)
    assert [b["accuracy"] for b in buckets] == [0.5, 1.0]
    p_low = (1 / (1 + math.exp(-0.1)) + 1 / (1 + math.exp(-0.2))) / 2
    p_high = (1 / (1 + math.exp(-3.0)) + 1 / (1 + math.exp(-4.0))) / 2
    assert ece == pytest.approx(0.5 * abs(0.5 - p_low) + 0.5 * abs(1.0 - p_high))


def test_one_held_out_split_for_label_and_reward():
    """`split_heldout` is label's rule and reward's for a single file: by a seeded hash of the prompt (messages as
    canonical JSON), every pair of a prompt on one side, file order kept."""
    from alignpipe.algos.preference import split_heldout
    from alignpipe.core.hashing import is_heldout

    rows = [{"prompt": f"p{i % 7}", "chosen": "\na", "rejected": "\nb", "i": i} for i in range(40)]
    train, held = split_heldout(rows, 0.3, seed=2)
    assert train and held and len(train) + len(held) == 40
    assert held == [r for r in rows if is_heldout(r["prompt"], 0.3, 2)]
    assert train == [r for r in rows if not is_heldout(r["prompt"], 0.3, 2)]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    chat = [{"prompt": [{"role": "user", "content": "é"}], "chosen": [], "rejected": []}]
    key = json.dumps(chat[0]["prompt"], sort_keys=True)  # as label has always hashed conversations
    assert split_heldout(chat, 0.5, 0)[1] == (chat if is_heldout(key, 0.5, 0) else [])


def test_reward_rejects_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="reward.resume"):
        reward.Config(resume=True, save_steps=0)
    with pytest.raises(ValueError, match="reward.warmup_ratio"):
        reward.Config(warmup_ratio=1.5)
    (tmp_path / "label").mkdir()
    make_prefs(tmp_path / "label" / "prefs.jsonl", n=4)
    with pytest.raises(DataError, match="held-out"):
        reward.load_pairs(tmp_path / "label", 0.1, 0)
    bad = tmp_path / "bad.jsonl"
    # Values are checked on entry by the validators (tests/test_entry_validation.py); load_pairs wants the standard
    # form and names the exact line (blank lines counted).
    bad.write_text("\n" + json.dumps({"prompt": "x", "chosen": [{"role": "assistant", "content": "y"}],
                                      "rejected": "\ny"}) + "\n")
    with pytest.raises(DataError, match=f"{bad}:2: field 'chosen' must be a string"):
        reward.load_pairs(bad, 0.5, 0)
