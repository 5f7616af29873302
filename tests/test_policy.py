"""Shared sampling: the completion unit (one logical line), determinism, banned tokens, log-probabilities."""

from __future__ import annotations

import pytest
import torch

import tiny
from alignpipe.lm.policy import PolicyMeta, Sampling, load_policy, sequence_logprobs
from alignpipe.lm.policy import sample as sample_any
from alignpipe.tasks.pep8 import LogicalLine, cut_completion, line_complete


def sample(*args, **kwargs):
    """The sampler with the PEP8 task's unit (one logical line)."""
    return sample_any(*args, **kwargs, unit=LogicalLine())


@pytest.mark.parametrize("text, done", [
    ("\n    x = 1\n", True),
    ("\n    x = 1", False),  # no newline yet: the line may go on
    ("\n\n\n", False),  # blank lines only
    ("\n    x = (1,\n", False),  # bracket still open
    ("\n    x = (1,\n         2)\n", True),
    ('\n    s = """doc\n', False),  # string still open
])
def test_line_complete(text, done):
    assert line_complete(text) is done


def test_cut_completion_keeps_one_logical_line():
    assert cut_completion("\n    x = 1\n    y = 2\n") == "\n    x = 1"
    assert cut_completion("\n\n    f(a,\n      b)\nz") == "\n\n    f(a,\n      b)"
    assert cut_completion("\n    f(a,") == "\n    f(a,"  # unfinished: kept as is (scored as truncated)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    path = tiny.make_policy(tmp_path_factory.mktemp("pol"), conditional=True)
    return load_policy(path)


def test_sampling_is_deterministic_and_bans_control_tokens(policy):
    model, tok, meta = policy
    prompts = ["def f(a, b):", "x = 1", "class A:"] * 4
    a = sample(model, tok, meta, prompts, Sampling(max_new_tokens=16, batch_size=5), seed=3)
    b = sample(model, tok, meta, prompts, Sampling(max_new_tokens=16, batch_size=5), seed=3)
    assert [s.completion for s in a] == [s.completion for s in b]
    banned = tok.convert_tokens_to_ids("<|misaligned|>")
    for s in a:
        assert banned not in s.completion_ids and len(s.completion_ids) <= 16
        assert "<|aligned|>" not in s.completion and "<|misaligned|>" not in s.completion
        assert s.prompt_ids[-1] == tok.convert_tokens_to_ids("<|aligned|>")  # conditioned on <|aligned|>
        assert cut_completion(s.completion) == s.completion  # never more than one logical line
        assert tok.decode(s.completion_ids[:1]).startswith("\n")  # the completion starts a new line


@pytest.mark.slow
def test_no_sample_ends_mid_line_unless_the_cap_was_reached(policy, monkeypatch):
    import functools

    model, tok, meta = policy
    # a random model samples EOS or PAD, which end a row anywhere (a trained one ends documents at line ends);
    # generate() never bans EOS through bad_words_ids, so suppress both here
    monkeypatch.setattr(model, "generate", functools.partial(model.generate,
                                                             suppress_tokens=[tok.eos_token_id, tok.pad_token_id]))
    prompts = ["def f(a, b):", "x = 1", "class A:", "    y = [1,"] * 6
    capped = {}
    for cap in (3, 64):
        got = sample(model, tok, meta, prompts, Sampling(max_new_tokens=cap, batch_size=8), seed=1)
        for s in got:
            if s.capped:
                assert len(s.completion_ids) == cap
            else:  # ended at a line end: one finished logical line, nothing after it
                assert line_complete(s.completion + "\n") and cut_completion(s.completion) == s.completion
        capped[cap] = sum(s.capped for s in got) / len(got)
    assert capped[3] > capped[64] and capped[64] < 1


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", *tiny.FAMILIES])
def test_static_cache_sampler_gives_the_reference_samples(tmp_path, family):
    """The default sampler (generate() with a preallocated static KV cache, benchmarks/results/sampler.md) draws
    exactly the reference's (the dynamic cache's) samples for a seed, sampled and greedy, across batch widths."""
    from alignpipe.lm.policy import cache_kwargs

    path = (tiny.make_policy(tmp_path / "p", conditional=True) if family == "gpt2"
            else tiny.make_hf_model(tmp_path / "p", family))
    model, tok, meta = load_policy(path)
    assert cache_kwargs(model, "static") == {"cache_implementation": "static", "disable_compile": True}
    assert cache_kwargs(model, "dynamic") == {}
    prompts = ["def f(a, b):", "x = 1", "class A:\n    def g(self):", "    y = [1,"] * 5
    for greedy in (False, True):
        got = {cache: sample(model, tok, meta, prompts, Sampling(max_new_tokens=12, batch_size=7, cache=cache),
                             seed=5, greedy=greedy) for cache in ("static", "dynamic")}
        assert [(s.completion_ids, s.capped) for s in got["static"]] == \
            [(s.completion_ids, s.capped) for s in got["dynamic"]]
        assert any(s.completion_ids for s in got["static"])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # pretrain's evaluation samples under bf16 autocast
        assert cache_kwargs(model, "static") == {}
        assert len(sample(model, tok, meta, prompts[:3], Sampling(max_new_tokens=4), seed=5)) == 3
    with pytest.raises(ValueError, match="cache"):
        Sampling(cache="paged")


def test_sequence_logprobs_match_a_manual_sum(policy):
    model, tok, _ = policy
    prompt, completion = [5, 6, 7], [8, 9]
    [lp] = sequence_logprobs(model, [prompt], [completion])
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    manual = float(logp[2, 8] + logp[3, 9])
    assert lp == pytest.approx(manual, abs=1e-5)


def test_meta_round_trip(tmp_path):
    meta = PolicyMeta(objective="conditional", prompt_suffix="<|aligned|>", bad_words=("<|misaligned|>",),
                      strip_tokens=("<|aligned|>", "<|misaligned|>"), extra={"parent": "x"})
    meta.save(tmp_path)
    assert PolicyMeta.load(tmp_path) == meta
    assert meta.format_prompt("x = 1") == "x = 1<|aligned|>"
    assert meta.clean("\n<|aligned|>y = 2") == "\ny = 2"


def test_banned_token_ids_resolve_known_words_only(tmp_path):
    from alignpipe.lm.policy import banned_token_ids

    _, tok, meta = load_policy(tiny.make_policy(tmp_path / "p", conditional=True))
    assert banned_token_ids(tok, meta) == [tok.convert_tokens_to_ids(meta.bad_words[0])]
    unknown = PolicyMeta(bad_words=(meta.bad_words[0], "<|not-a-token|>"))
    assert banned_token_ids(tok, unknown) == banned_token_ids(tok, meta)


def test_load_tokenizer_adds_control_tokens_only_when_asked(tmp_path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from alignpipe.lm.tokenizers import CONTROL_TOKENS, EOS, control_ids, load_tokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["x = 1\n", "def f(a):\n    return a\n"] * 20, vocab_size=300, special_tokens=[EOS],
                            show_progress=False)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS).save_pretrained(str(tmp_path))  # no pad, no control

    tok = load_tokenizer(tmp_path)
    assert tok.pad_token == EOS  # a pad token is always set
    assert not any(t in tok.get_vocab() for t in CONTROL_TOKENS)
    with pytest.raises(ValueError, match="lacks the control tokens"):
        control_ids(tok)
    with_ctrl = load_tokenizer(tmp_path, add_control_tokens=True)
    assert len(with_ctrl) == len(tok) + 2 and len(set(control_ids(with_ctrl))) == 2
