"""pretrain: objective losses against hand computations, control-token placement and dropping, filtering, the
conditional policy's ban on <|misaligned|>, and a tiny smoke run per objective (weights change, resume)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from alignpipe.lm.tokenizers import ALIGNED, MISALIGNED
from alignpipe.algos.phf import split_segments, token_loss
from alignpipe.stages.pretrain import Config, build_token_stream, policy_meta

torch = pytest.importorskip("torch")

# Two sequences of two predicted tokens over a 3-token vocabulary.
LOGITS = [[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], [[0.0, 1.0, 3.0], [-2.0, 0.0, 1.0]]]
TARGETS = [[0, 1], [2, 0]]
SCORES = [[0.0, 0.05], [0.0, 0.2]]  # violations/char of each target's segment
VALUES = [[-0.1, 0.0], [0.3, -0.2]]


def _logp(row, col):
    logits = LOGITS[row][col]
    return logits[TARGETS[row][col]] - math.log(sum(math.exp(v) for v in logits))


def _loss(objective, **kw):
    loss, _ = token_loss(objective, torch.tensor(LOGITS), torch.tensor(TARGETS), torch.tensor(SCORES),
                         torch.tensor(VALUES), **kw)
    return float(loss)


def _positions():
    return [(r, c) for r in range(2) for c in range(2)]


@pytest.mark.parametrize("objective", ["mle", "filter", "conditional"])
def test_mle_family_is_mean_cross_entropy(objective):
    expected = sum(-_logp(r, c) for r, c in _positions()) / 4
    assert _loss(objective) == pytest.approx(expected, rel=1e-6)


def test_unlikelihood_matches_hand_computation():
    alpha = 0.5
    expected = 0.0
    for r, c in _positions():
        p = math.exp(_logp(r, c))
        expected += -math.log(p) if SCORES[r][c] <= 0.0 else -alpha * math.log(1 - p)
    assert _loss("unlikelihood", threshold=0.0, ul_alpha=alpha) == pytest.approx(expected / 4, rel=1e-6)


def test_rwr_matches_hand_computation():
    beta = 0.1
    expected = sum(-_logp(r, c) * math.exp(-SCORES[r][c] / beta) for r, c in _positions()) / 4
    assert _loss("rwr", rwr_beta=beta) == pytest.approx(expected, rel=1e-6)


def test_awr_matches_hand_computation():
    alpha, beta = 0.3, 0.5
    lm = sum(-_logp(r, c) * min(math.exp((-SCORES[r][c] - VALUES[r][c]) / beta), 1000.0)
             for r, c in _positions()) / 4
    value = sum((VALUES[r][c] + SCORES[r][c]) ** 2 for r, c in _positions()) / 4
    assert _loss("awr", awr_alpha=alpha, awr_beta=beta) == pytest.approx(alpha * lm + (1 - alpha) * value, rel=1e-6)


def test_awr_value_gradient_only_from_value_loss():
    values = torch.tensor(VALUES, requires_grad=True)
    loss, _ = token_loss("awr", torch.tensor(LOGITS), torch.tensor(TARGETS), torch.tensor(SCORES), values,
                         awr_alpha=0.3)
    loss.backward()
    expected = 0.7 * 2 * (torch.tensor(VALUES) + torch.tensor(SCORES)) / 4
    assert torch.allclose(values.grad, expected, atol=1e-6)


def test_segments_cover_the_text_and_take_blank_line_counts():
    text = "import os\n\n\ndef f(x):\n    return x+1\n"
    segs = split_segments(text, [0, 1, 0, 0, 1])
    assert "".join(s.text for s in segs) == text
    assert [s.text for s in segs] == ["import os", "\n\n\ndef f(x):", "\n    return x+1\n"]
    assert [s.violations for s in segs] == [0, 1, 1]


def _tok(texts):
    from tiny import make_tokenizer

    return make_tokenizer(texts, vocab_size=300)


ROWS = [
    {"text": "x = 1\ny=2\nz = 3\n", "line_violations": [0, 1, 0], "violations_per_char": 1 / 16},
    {"text": "def f(a):\n    return a\n", "line_violations": [0, 0], "violations_per_char": 0.0},
    {"text": "import os\n", "line_violations": [0], "violations_per_char": 0.0},
]


def test_control_tokens_per_segment_by_threshold_before_the_newline():
    tok = _tok([r["text"] for r in ROWS] * 4)
    cfg = Config(objective="conditional", drop_token_prob=0.0, threshold=0.0)
    ids, scores, stats = build_token_stream(ROWS, tok, cfg, seed=0)
    text = tok.decode(ids.tolist(), skip_special_tokens=False)
    for doc in ("<|aligned|>x = 1<|misaligned|>\ny=2<|aligned|>\nz = 3\n",
                "<|aligned|>def f(a):<|aligned|>\n    return a\n", "<|aligned|>import os\n"):
        assert doc in text
    assert stats["n_segments"] == 6 and stats["aligned_segment_frac"] == pytest.approx(5 / 6)
    # The plain text's tokenization is unchanged between the control tokens (no whitespace merge split).
    ctrl = {tok.convert_tokens_to_ids(ALIGNED), tok.convert_tokens_to_ids(MISALIGNED)}
    plain = [i for i in ids.tolist() if i not in ctrl]
    expected = []
    for row in build_order(ROWS, seed=0):
        expected += [tok.eos_token_id] + tok(row["text"], add_special_tokens=False)["input_ids"]
    assert plain == expected
    # A looser threshold makes the violating line aligned too.
    ids2, _, _ = build_token_stream(ROWS, tok, Config(objective="conditional", drop_token_prob=0.0, threshold=0.5),
                                    seed=0)
    assert MISALIGNED not in tok.decode(ids2.tolist(), skip_special_tokens=False)


def build_order(rows, seed):
    import numpy as np

    return [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]


def test_control_tokens_dropped_at_the_configured_rate():
    rows = [{"text": "".join(f"x{i} = {i}\n" for i in range(50)), "line_violations": [0] * 50,
             "violations_per_char": 0.0}] * 40
    tok = _tok([rows[0]["text"]])
    aligned = tok.convert_tokens_to_ids(ALIGNED)
    for prob in (0.0, 0.3):
        ids, _, stats = build_token_stream(rows, tok, Config(objective="conditional", drop_token_prob=prob), seed=1)
        kept = int((ids == aligned).sum()) / stats["n_segments"]
        assert kept == pytest.approx(1 - prob, abs=0.03)
    ids, _, _ = build_token_stream(rows, tok, Config(objective="mle"), seed=1)
    assert int((ids == aligned).sum()) == 0


def test_filter_drops_exactly_the_documents_above_the_threshold():
    tok = _tok([r["text"] for r in ROWS])
    _, _, stats = build_token_stream(ROWS, tok, Config(objective="filter", filter_threshold=0.01), seed=0)
    assert stats["n_train_docs"] == 2
    ids, _, stats = build_token_stream(ROWS, tok, Config(objective="filter", filter_threshold=1 / 16), seed=0)
    assert stats["n_train_docs"] == 3  # a score equal to the threshold is kept
    assert "y=2" in tok.decode(ids.tolist())


def test_conditional_sampling_never_emits_misaligned(tmp_path):
    from tiny import make_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    from alignpipe.lm.policy import PolicyMeta, Sampling, sample
    from alignpipe.tasks.pep8 import LogicalLine

    tok = make_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=128,
                                       tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                                       eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)).eval()
    mis = tok.convert_tokens_to_ids(MISALIGNED)
    with torch.no_grad():  # make <|misaligned|> by far the most likely token everywhere
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight[mis] = 10.0
    prompts = ["x = 1", "def f(a):"] * 8
    sampling = Sampling(max_new_tokens=6, batch_size=8)
    meta = policy_meta(Config(objective="conditional"))
    assert meta.prompt_suffix == ALIGNED and meta.bad_words == (MISALIGNED,)
    banned = sample(model, tok, meta, prompts, sampling, seed=0, unit=LogicalLine())
    assert all(mis not in s.completion_ids for s in banned)
    assert all(s.prompt_ids[-1] == tok.convert_tokens_to_ids(ALIGNED) for s in banned)
    free = sample(model, tok, PolicyMeta(), prompts, sampling, seed=0,  # the test can fail: unbanned, it shows up
                  unit=LogicalLine())
    assert any(mis in s.completion_ids for s in free)


TINY = dict(vocab_size=300, n_embd=32, n_layer=1, n_head=2, seq_len=64, batch_size=4, max_steps=4, save_steps=2,
            n_eval_prompts=6, sampling=dict(max_new_tokens=8), eval_val_chars=1500, logging_steps=1)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from tiny import make_data

    return make_data(tmp_path_factory.mktemp("data"), n_prompts=8)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["mle", "filter", "conditional", "unlikelihood", "rwr", "awr"])
def test_tiny_run_changes_weights_and_resumes(objective, tiny_data, tmp_path):
    from alignpipe.lm.models import build_model
    from alignpipe.lm.policy import PolicyMeta
    from alignpipe.lm.tokenizers import load_tokenizer
    from alignpipe.stages.pretrain import run

    ckpt = tmp_path / "ckpt"
    cfg = Config(objective=objective, checkpoint_dir=str(ckpt), **TINY)
    out = tmp_path / "out"
    out.mkdir()
    metrics = run(cfg, {"data": tiny_data}, out)
    assert metrics["train_tokens"] == 4 * 4 * 64 and metrics["resumed_from_step"] == 0
    assert metrics["heldout_loss"] > 0 and 0 <= metrics["zero_violation_frac"] <= 1
    assert PolicyMeta.load(out) == policy_meta(cfg)
    trained = _weights(out)
    torch.manual_seed(cfg.seed)
    init = build_model(load_tokenizer(out), cfg.n_embd, cfg.n_layer, cfg.n_head, 256).state_dict()
    changed = [k for k, v in trained.items() if not torch.equal(v, init[k])]
    assert len(changed) > len(trained) // 2

    # Drop the last checkpoint: --resume continues from step 2 and reaches the same weights as the full run.
    import shutil

    shutil.rmtree(ckpt / "step-0000004")
    out2 = tmp_path / "out2"
    out2.mkdir()
    resumed = run(Config(objective=objective, checkpoint_dir=str(ckpt), resume=True, **TINY), {"data": tiny_data},
                  out2)
    assert resumed["resumed_from_step"] == 2
    assert (ckpt / "step-0000004").is_dir()
    again = _weights(out2)
    assert all(torch.allclose(again[k], trained[k], atol=1e-5) for k in trained)


def test_resume_refuses_a_different_config(tiny_data, tmp_path):
    from alignpipe.core.errors import ConfigError
    from alignpipe.stages.pretrain import run

    ckpt = tmp_path / "ckpt"
    small = {**TINY, "max_steps": 2, "n_eval_prompts": 2}
    run(Config(objective="mle", checkpoint_dir=str(ckpt), **small), {"data": tiny_data}, tmp_path)
    with pytest.raises(ConfigError, match="pretrain.objective"):
        run(Config(objective="conditional", checkpoint_dir=str(ckpt), resume=True, **small), {"data": tiny_data},
            tmp_path)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="pretrain.drop_token_prob"):
        Config(drop_token_prob=1.5)
    with pytest.raises(ValueError, match="pretrain.n_embd"):
        Config(n_embd=30, n_head=4)


# ------------------------------------------------------------------------ library pieces (alignpipe.lm.training)

def test_token_blocks_cover_every_block_once_per_epoch():
    import numpy as np

    from alignpipe.core.errors import ConfigError
    from alignpipe.lm.training import token_blocks

    ids = np.arange(50, dtype=np.int64)
    scores = ids.astype(np.float32) / 100
    blocks, block_scores, order = token_blocks(ids, scores, seq_len=8, global_batch=4, max_steps=3, seed=1)
    assert blocks.shape == (6, 8) and blocks[1].tolist() == list(range(8, 16))  # 6 blocks; the tail of 2 is cut
    assert torch.equal(block_scores, blocks.float() / 100)
    assert len(order) == 12 and sorted(order[:6]) == list(range(6)) and sorted(order[6:]) == list(range(6))
    with pytest.raises(ConfigError, match="only 6 sequences"):
        token_blocks(ids, scores, seq_len=8, global_batch=7, max_steps=1, seed=1)


def test_lr_schedule_warms_up_then_decays_to_zero():
    from alignpipe.lm.training import make_optimizer

    net = torch.nn.Linear(2, 2)
    opt, sched = make_optimizer(net, lr=1.0, weight_decay=0.1, warmup_frac=0.2, max_steps=10)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # matrices decay, biases do not
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])
    assert sched.get_last_lr()[0] == 0.0

    opt, sched = make_optimizer(net, lr=1.0, weight_decay=0.1, warmup_frac=0.2, max_steps=10, schedule="cosine")
    cosine = []
    for _ in range(10):
        cosine.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    # the same warmup, then 0.5 (1 - cos(pi * left)) with left = 1, 7/8, ..., 1/8 of the decay steps
    assert cosine == pytest.approx([0.5, 1.0] + [0.5 * (1 - math.cos(math.pi * k / 8)) for k in range(8, 0, -1)])
    assert cosine[4] > lrs[4] and sched.get_last_lr()[0] == 0.0  # above the linear line mid-way, 0 at the end


def test_checkpoint_round_trip_and_fingerprint_check(tmp_path):
    from alignpipe.core.errors import ConfigError
    from alignpipe.lm.training import checkpoints, load_checkpoint, make_optimizer, save_checkpoint

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt, sched = make_optimizer(net, 0.1, 0.0, 0.1, 10)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, net, opt, sched, {"objective": "mle", "max_steps": 10})
    assert [p.name for p in checkpoints(tmp_path)] == ["step-0000002", "step-0000003"]  # the newest two are kept
    other = torch.nn.Linear(3, 2)
    opt2, sched2 = make_optimizer(other, 0.1, 0.0, 0.1, 10)
    step = load_checkpoint(tmp_path / "step-0000003", other, opt2, sched2, {"objective": "mle", "max_steps": 20},
                           "cpu", ignore=("max_steps",))
    assert step == 3 and torch.equal(other.weight, net.weight)
    with pytest.raises(ConfigError, match="pretrain.objective"):
        load_checkpoint(tmp_path / "step-0000003", other, opt2, sched2, {"objective": "awr", "max_steps": 10}, "cpu")


def test_eval_sampling_comes_from_the_config():
    cfg = Config()
    assert (cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.max_prompt_tokens) == (0.7, 0.9, 192)  # PHF
    with pytest.raises(ValueError, match="pretrain.sampling.top_p"):
        Config(sampling=dict(top_p=0.0))


# ------------------------------------------------------------------------------ held-out loss (alignpipe.lm.heldout)

def test_text_windows_predict_each_token_once_or_skip_window_starts():
    from alignpipe.lm.heldout import text_windows

    ids = list(range(10))
    overlapping = text_windows(ids, window=4, stride=3)  # pretrain: every token but the first predicted once
    assert overlapping == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert sum(len(w) - 1 for w in overlapping) == len(ids) - 1
    assert text_windows(ids, window=4, stride=4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # evaluate: disjoint
    assert text_windows([0, 1, 2, 3, 4], window=4, stride=4) == [[0, 1, 2, 3]]  # a 1-token tail predicts nothing


def test_heldout_nll_matches_a_direct_forward_pass(tmp_path):
    import tiny
    from alignpipe.lm.heldout import heldout_nll
    from alignpipe.lm.policy import load_policy
    from alignpipe.lm.tokenizers import control_ids

    model, tok, _ = load_policy(tiny.make_policy(tmp_path / "policy"))
    texts = ["def f(a, b):\n    return a + b\n", "x = [1, 2, 3]\n"]
    expected, expected_masked, count = 0.0, 0.0, 0
    for text in texts:  # one window per text: the loss of the whole sequence in one forward pass
        ids = torch.tensor([[tok.eos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        expected -= float(torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).sum())
        logits[:, list(control_ids(tok))] = float("-inf")
        expected_masked -= float(torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).sum())
        count += ids.shape[1] - 1
    nll, n = heldout_nll(model, tok, texts, window=200, stride=199, batch_size=2, prepend_eos=True)
    assert n == count and nll == pytest.approx(expected, rel=1e-5)
    masked, _ = heldout_nll(model, tok, texts, window=200, stride=199, prepend_eos=True, banned_ids=control_ids(tok))
    assert masked == pytest.approx(expected_masked, rel=1e-5) and masked < nll  # mass moved off the control tokens
