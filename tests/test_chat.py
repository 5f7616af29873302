"""The chat task on a tiny Llama with a chat template: reward and dpo train on conversational pairs through the
chat template (TRL applies it), register gates on the task's metric and direction."""

from __future__ import annotations

import json

import pytest

import tiny
from alignpipe.core.runner import execute

pytestmark = pytest.mark.usefixtures("module_mlflow")  # one MLflow store per module (conftest)


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """A plain tiny Llama directory and a chat data directory built by `data build --dataset`."""
    from alignpipe.stages.data import Config

    root = tmp_path_factory.mktemp("chat")
    prefs = tiny.make_chat_prefs(root / "prefs.parquet", n=48)
    execute("data", Config(task="chat", dataset=str(prefs), test_frac=0.25, val_frac=0.1, n_prompts=8), {},
            root / "data")
    return {"root": root, "data": root / "data", "llama": tiny.make_chat_llama(root / "llama")}


def test_reward_trains_on_conversations_through_the_chat_template(chat, tmp_path):
    from alignpipe.lm.reward_model import reward_ids
    from alignpipe.stages import reward

    rows = [json.loads(x) for x in (chat["data"] / "prefs.jsonl").read_text().splitlines()]
    model, tok = reward.load_model(str(chat["llama"]), reward.Config())
    trainer = reward.build_trainer(reward.Config(max_length=128, save_steps=0, checkpoint_dir=str(tmp_path / "c")),
                                   model, tok, rows[:2])
    example = trainer.train_dataset[0]
    assert example["chosen_ids"] == reward_ids(rows[0]["prompt"], rows[0]["chosen"], tok)
    text = tok.decode(example["chosen_ids"])
    assert text.startswith("<|im_start|>") and text.count("<|im_end|>") == len(rows[0]["prompt"]) + 1
    assert reward_ids(rows[0]["prompt"], rows[0]["chosen"][0]["content"], tok) == example["chosen_ids"]

    cfg = reward.Config(max_steps=6, batch_size=8, learning_rate=3e-3, warmup_ratio=0.0, save_steps=0,
                        max_length=128, checkpoint_dir=str(tmp_path / "ckpt"))
    metrics = execute("reward", cfg, {"prefs": chat["data"], "policy": chat["llama"]}, tmp_path / "rm")
    assert metrics["n_train_pairs"] == len(rows) and metrics["n_changed_tensors"] > 0
    assert metrics["n_heldout_pairs"] > 0 and 0 <= metrics["heldout_accuracy"] <= 1
    assert "chat template" in json.loads((tmp_path / "rm" / "reward.json").read_text())["format"]
