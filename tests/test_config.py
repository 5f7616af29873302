"""Typed configs: params sections, --set overrides, and errors that name the key."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import pytest

from alignpipe.core.config import StageConfig, apply_overrides, build_config, field, load_params
from alignpipe.core.errors import ConfigError


@dataclass(frozen=True)
class Demo(StageConfig):
    SECTION: ClassVar[str] = "demo"

    lr: float = field(1e-3, "learning rate")
    steps: int = field(10, "steps")
    objective: Literal["mle", "conditional"] = field("mle", "objective")
    model: str | None = field(None, "model id")
    flags: list[str] = field(["a"], "flags")
    bf16: bool = field(True, "bf16")

    def __post_init__(self):
        self.check(self.lr > 0, "lr", "must be > 0")


def test_defaults_and_types():
    cfg = Demo.from_dict({"lr": 1, "steps": 3, "objective": "conditional", "flags": ["x", "y"]})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert (cfg.steps, cfg.objective, cfg.flags, cfg.model, cfg.bf16) == (3, "conditional", ["x", "y"], None, True)
    with pytest.raises(Exception):
        cfg.lr = 2.0  # frozen


@pytest.mark.parametrize("values, key, words", [
    ({"lrr": 1}, "demo.lrr", "unknown key; allowed keys: bf16, flags, lr, model, objective, steps"),
    ({"steps": 1.5}, "demo.steps", "expected int"),
    ({"steps": True}, "demo.steps", "expected int"),
    ({"objective": "rl"}, "demo.objective", "one of 'mle', 'conditional'"),
    ({"bf16": "yes"}, "demo.bf16", "expected bool"),
    ({"flags": [1]}, "demo.flags[0]", "expected str"),
    ({"lr": float("nan")}, "demo.lr", "must be a finite number"),
    ({"lr": float("inf")}, "demo.lr", "must be a finite number"),
    ({"lr": "1e309"}, "demo.lr", "must be a finite number"),
    ({"lr": "nan"}, "demo.lr", "expected float"),
    ({"lr": "1e-3x"}, "demo.lr", "expected float"),
    ({"lr": -1}, "demo", "demo.lr must be > 0, got -1.0"),
])
def test_bad_values_name_the_key(values, key, words):
    with pytest.raises(ConfigError) as e:
        Demo.from_dict(values)
    assert e.value.where == key
    assert words in e.value.reason


def test_overrides_parse_yaml_and_reject_unknown_keys(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("demo:\n  lr: 0.5\n")
    params = apply_overrides(load_params(p), ["demo.steps=7", "demo.flags=[b, c]", "demo.model=gpt2"],
                             {"demo": Demo})
    cfg = build_config(Demo, params)
    assert (cfg.lr, cfg.steps, cfg.flags, cfg.model) == (0.5, 7, ["b", "c"], "gpt2")
    # PyYAML reads an exponent without a dot (1e-3) as a string; a float field takes it as the number it is.
    assert build_config(Demo, apply_overrides(params, ["demo.lr=1e-3"], {"demo": Demo})).lr == 0.001
    with pytest.raises(ConfigError, match="unknown key"):
        apply_overrides(params, ["demo.nope=1"], {"demo": Demo})
    with pytest.raises(ConfigError, match="unknown section 'other'"):
        apply_overrides(params, ["other.x=1"], {"demo": Demo})
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides(params, ["steps=1"], {"demo": Demo})


def test_bad_params_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("demo: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_params(bad)


def test_every_stage_config_loads_from_params_yaml_and_tiny():
    """params.yaml and configs/*.yaml hold valid sections for every stage that exists, and the same sections."""
    from pathlib import Path

    from alignpipe.stages import config_classes

    root = Path(__file__).parents[1]
    files = [root / "params.yaml", root / "configs" / "tiny.yaml", root / "configs" / "gpu.yaml"]
    sections = [set(load_params(f)) for f in files]
    assert sections[0] == sections[1] == sections[2]
    known = config_classes()
    for f in files:
        params = load_params(f)
        for name in known:
            build_config(known[name], params)


ROOT = Path(__file__).resolve().parents[1]


def test_overlay_layers_on_its_base_and_reports_origins(tmp_path):
    from alignpipe.core.config import effective_params
    from alignpipe.stages import config_classes

    (tmp_path / "params.yaml").write_text("dpo:\n  beta: 0.3\n  max_steps: 7\n")
    (tmp_path / "conf").mkdir()
    overlay = tmp_path / "conf" / "small.yaml"
    overlay.write_text("overlay: ../params.yaml\ndpo:\n  max_steps: 2\n")
    assert load_params(overlay) == {"dpo": {"beta": 0.3, "max_steps": 2}}
    eff = effective_params(overlay, ["dpo.seed=5"], config_classes())
    assert eff["dpo"]["beta"] == (0.3, str(tmp_path / "params.yaml"))
    assert eff["dpo"]["max_steps"] == (2, str(overlay))
    assert eff["dpo"]["seed"] == (5, "--set")
    assert eff["dpo"]["loss_type"] == ("sigmoid", "default")


def test_config_show_prints_values_and_origins(capsys):
    from alignpipe.cli.main import main

    assert main(["config", "show", "--params", str(ROOT / "configs" / "tiny.yaml"), "--set", "dpo.beta=0.2",
                 "--section", "dpo"]) == 0
    lines = {line.split(" = ")[0].strip(): line for line in capsys.readouterr().out.splitlines()}
    assert lines["dpo.beta"].endswith("(--set)") and "0.2" in lines["dpo.beta"]
    assert lines["dpo.max_steps"].endswith("tiny.yaml)") and " 4 " in lines["dpo.max_steps"]
    assert lines["dpo.bf16"].endswith("params.yaml)")
    assert lines["dpo.loss_type"].endswith("(default)")


def test_bad_overlay_chain_is_a_config_error(tmp_path):
    loop = tmp_path / "a.yaml"
    loop.write_text("overlay: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_params(loop)
    missing = tmp_path / "b.yaml"
    missing.write_text("overlay: nope.yaml\n")
    with pytest.raises(ConfigError, match="nope.yaml: params file not found"):
        load_params(missing)


@pytest.mark.parametrize("name", ["params.yaml", "configs/tiny.yaml", "configs/gpu.yaml", "configs/quality.yaml",
                                  "configs/chat-tiny.yaml", "configs/chat-gpu.yaml"])
def test_params_files_list_only_what_they_change(name):
    """Defaults once: params.yaml sets no key to its dataclass default, an overlay no key to its base's value."""
    from alignpipe.core.config import params_layers
    from alignpipe.stages import config_classes

    known = config_classes()
    layers = params_layers(ROOT / name)
    below: dict = {}
    for _, sections in layers[:-1]:
        for section, values in sections.items():
            below.setdefault(section, {}).update(values)
    for section, values in layers[-1][1].items():
        base = build_config(known[section], below).to_dict()
        for key, value in values.items():
            assert value != base[key], f"{name}: {section}.{key} repeats the value beneath it"


def test_config_show_yaml_is_a_standalone_params_file(tmp_path, capsys):
    from alignpipe.cli.main import main
    from alignpipe.stages import config_classes

    tiny = ROOT / "configs" / "tiny.yaml"
    assert main(["config", "show", "--params", str(tiny), "--yaml"]) == 0
    standalone = tmp_path / "params.yaml"
    standalone.write_text(capsys.readouterr().out)
    known = config_classes()
    for section in known:
        assert build_config(known[section], load_params(standalone)) == build_config(known[section], load_params(tiny))


@pytest.mark.parametrize("section, old, new", [
    ("pretrain", "lr", "learning_rate"), ("pretrain", "save_every", "save_steps"), ("ppo", "save_every", "save_steps"),
    ("pretrain", "eval_prompts", "n_eval_prompts"), ("pretrain", "log_every", "logging_steps"),
    ("reward", "lr_scheduler", "lr_scheduler_type"), ("reward", "epochs", "num_train_epochs"),
    ("reward", "grad_accum", "gradient_accumulation_steps"), ("reward", "center_rewards", "center_rewards_coefficient"),
    ("ppo", "ppo_epochs", "num_ppo_epochs"), ("evaluate", "temperature", "sampling.temperature"),
    ("evaluate", "batch_size", "sampling.batch_size"), ("label", "max_new_tokens", "sampling.max_new_tokens"),
    ("pretrain", "eval_top_p", "sampling.top_p"), ("pretrain", "eval_max_new_tokens", "sampling.max_new_tokens"),
    ("ppo", "temperature", "sampling.temperature"), ("grpo", "max_prompt_tokens", "sampling.max_prompt_tokens"),
    ("dpo", "eval_batch_size", "sampling.batch_size"), ("orpo", "eval_batch_size", "sampling.batch_size"),
    ("pretrain", "compile", "torch_compile"),
])
def test_an_old_key_names_its_new_name(section, old, new, tmp_path, capsys):
    """Hugging Face naming: an old key in a params file or --set gets one line naming the new key."""
    from alignpipe.cli.main import main

    assert main(["config", "show", "--set", f"{section}.{old}=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{section}.{old}: renamed to {section}.{new}") and "\n" not in err
    p = tmp_path / "params.yaml"
    p.write_text(f"{section}:\n  {old}: 1\n")
    assert main(["config", "show", "--params", str(p)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{section}.{old}: renamed to {section}.{new}")



def test_a_nested_sampling_key_through_set_yaml_and_overlay(tmp_path, capsys):
    """One sampling group shared by the stages that sample: `section.sampling.key` through --set, a params file
    and an overlay (which changes only the keys it lists), on each stage's own defaults."""
    from alignpipe.cli.main import main
    from alignpipe.lm.policy import Sampling
    from alignpipe.stages import config_classes, evaluate, label, ppo, pretrain

    base = tmp_path / "base.yaml"
    base.write_text("evaluate:\n  sampling:\n    temperature: 0.5\n    batch_size: 8\nlabel:\n  sampling:\n"
                    "    top_p: 0.8\n")
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("overlay: base.yaml\nevaluate:\n  sampling:\n    max_new_tokens: 12\n")
    params = apply_overrides(load_params(overlay), ["evaluate.sampling.top_p=0.95"], config_classes())
    cfg = build_config(evaluate.Config, params)
    assert cfg.sampling == Sampling(temperature=0.5, top_p=0.95, max_new_tokens=12, batch_size=8)
    assert isinstance(cfg.sampling.max_new_tokens, int) and isinstance(cfg.sampling.temperature, float)
    assert build_config(label.Config, params).sampling == Sampling(top_p=0.8, max_new_tokens=32, batch_size=256)
    assert build_config(pretrain.Config, params).sampling == Sampling()  # the defaults, written once
    assert build_config(ppo.Config, params).sampling == Sampling(top_p=1.0)
    assert evaluate.Config(**cfg.to_dict()) == cfg  # a group's mapping is built on the stage's default
    assert label.Config(sampling={"temperature": 1.0}).sampling == Sampling(temperature=1.0, max_new_tokens=32,
                                                                             batch_size=256)

    assert main(["config", "show", "--params", str(overlay), "--set", "evaluate.sampling.seed=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("evaluate.sampling.seed: unknown key; allowed keys: batch_size, cache, max_new_tokens, "
                        "max_prompt_tokens, temperature, top_p") and "\n" not in err
    for item, words in (("evaluate.sampling.top_p=1.5", "evaluate.sampling.top_p must be <= 1, got 1.5"),
                        ("evaluate.sampling=3", "evaluate.sampling: expected a mapping of key: value, got 3"),
                        ("evaluate.sampling.cache=paged", "evaluate.sampling.cache must be one of static, dynamic"),
                        ("ppo.sampling.top_p=0.9", "ppo.sampling.top_p must be 1")):
        assert main(["config", "show", "--set", item]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err, err
    assert main(["config", "show", "--params", str(overlay), "--section", "evaluate"]) == 0
    shown = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[2:] for line in shown.splitlines()}
    assert rows["evaluate.sampling.max_new_tokens"] == ["12", f"({overlay})"]
    assert rows["evaluate.sampling.temperature"] == ["0.5", f"({base})"]
    assert rows["evaluate.sampling.top_p"] == ["0.9", "(default)"]


# ------------------------------------------------------------------------------------ field-declared constraints

@dataclass(frozen=True)
class Bounded(StageConfig):
    SECTION: ClassVar[str] = "bounded"

    steps: int = field(10, "steps", ge=1, le=100)
    frac: float = field(0.5, "a fraction", gt=0, lt=1)
    limit: int = field(-1, "-1 = all", ge=1, le=9, allow=(-1,))
    mode: str = field("a", "a mode", choices=("a", "b"))
    name: str = field("x", "a name", nonempty=True)
    pairs: list[str] = field([], "NAME=PATH entries", pattern=(r"\w+=\S+", "NAME=PATH"))


@pytest.mark.parametrize("values, words", [
    ({"steps": 0}, "bounded.steps must be >= 1, got 0"),
    ({"steps": 101}, "bounded.steps must be <= 100, got 101"),
    ({"frac": 0}, "bounded.frac must be > 0, got 0.0"),
    ({"frac": 1}, "bounded.frac must be < 1, got 1.0"),
    ({"limit": 0}, "bounded.limit must be >= 1 (or -1), got 0"),
    ({"limit": 10}, "bounded.limit must be <= 9, got 10"),
    ({"mode": "c"}, "bounded.mode must be one of a, b, got 'c'"),
    ({"name": "  "}, "bounded.name must not be empty, got '  '"),
    ({"pairs": ["a=b", "oops"]}, "bounded.pairs must be NAME=PATH ('oops' is not)"),
    ({"steps": 10 ** 40}, "bounded.steps must be <= 100, got an integer of 41 digits"),
])
def test_field_constraints_refuse_with_one_line_naming_the_key(values, words):
    with pytest.raises(ConfigError) as e:
        Bounded.from_dict(values)
    assert words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match=re.escape(words)):  # built directly, the same check
        Bounded(**{k: float(v) if k == "frac" else v for k, v in values.items()})


def test_field_constraints_accept_their_bounds_and_sentinels():
    cfg = Bounded.from_dict({"steps": 100, "frac": 0.999, "limit": -1, "mode": "b", "pairs": ["a=b"]})
    assert (cfg.steps, cfg.limit, cfg.mode) == (100, -1, "b")
    assert Bounded.from_dict({"limit": 9}).limit == 9


def _violating(f):
    """A value that breaks `f`'s first declared bound or choice, or None when it declares neither."""
    m = f.metadata
    if "le" in m:
        return m["le"] + 1
    if "lt" in m:
        return m["lt"]
    if "ge" in m:
        return m["ge"] - 1 if m["ge"] - 1 not in m.get("allow", ()) else m["ge"] - 2
    if "gt" in m:
        return m["gt"]
    if "choices" in m:
        return "not-a-choice"
    return None


def test_every_stage_config_checks_its_declared_constraints():
    """Each bounded field of every stage refuses a value outside its bounds, naming section.key (a stage's
    `__post_init__` that forgot `super().__post_init__()` fails here)."""
    import dataclasses

    from alignpipe.stages import config_classes

    known = config_classes()
    checked = 0
    for section in known:
        cls = known[section]
        for f in dataclasses.fields(cls):
            bad = _violating(f)
            if bad is None:
                continue
            with pytest.raises(ConfigError, match=rf"{section}\.{f.name} must be"):
                cls.from_dict({f.name: bad})
            with pytest.raises(ValueError, match=rf"{section}\.{f.name} must be"):
                cls(**{f.name: float(bad) if isinstance(f.default, float) else bad})
            checked += 1
    assert checked > 150


@pytest.mark.parametrize("item, words", [
    ("pretrain.max_steps=1000000000000", "pretrain.max_steps must be <= 10000000"),
    ("pretrain.n_layer=100000", "pretrain.n_layer must be <= 256"),
    ("pretrain.n_embd=1000000", "pretrain.n_embd must be <= 16384"),
    ("pretrain.vocab_size=1000000000", "pretrain.vocab_size must be <= 1048576"),
    ("evaluate.sampling.max_new_tokens=1000000000", "evaluate.sampling.max_new_tokens must be <= 131072"),
    ("ppo.sampling.max_new_tokens=1000000000", "ppo.sampling.max_new_tokens must be <= 131072"),
    ("pretrain.threads=100000", "pretrain.threads must be <= 1024"),
    ("pretrain.seed=100000000000000000000000000000", "pretrain.seed must be <= 4294967295"),
    ("pretrain.seed=1e29", "pretrain.seed: expected int"),
    ("data.seed=-1", "data.seed must be >= 0"),
    ("reward.lr_scheduler_type=evil", "reward.lr_scheduler_type must be one of linear, cosine"),
    ("register.model_name=a/b", "register.model_name must be a registered-model name"),
    ("register.reward_model_name=models:/x", "register.reward_model_name must be a registered-model name"),
    ("register.alias=latest", "register.alias must be an alias"),
    ("evaluate.champion_model=.", "evaluate.champion_model must be a registered-model name"),
    ("pretrain.seed=1" + "0" * 5000, "pretrain.seed: not a readable value"),
])
def test_impossible_budgets_and_bad_names_fail_when_the_config_is_built(item, words, capsys):
    """Issue 29: sizes, seeds, choices and registered-model names refused by `config show`, with one line."""
    from alignpipe.cli.main import main

    assert main(["config", "show", "--set", item]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err and len(err) < 400


def test_a_from_scratch_model_too_large_for_any_node_is_refused():
    from alignpipe.stages.pretrain import Config

    with pytest.raises(ConfigError, match="pretrain.n_layer with n_embd=16384 builds a"):
        Config.from_dict({"n_layer": 256, "n_embd": 16384, "n_head": 128})
    assert Config.from_dict({"n_layer": 256, "n_embd": 16384, "n_head": 128, "init_model": "gpt2"}).n_layer == 256


def test_reward_schedulers_are_transformers_scheduler_names():
    from transformers import SchedulerType

    from alignpipe.stages.reward import LR_SCHEDULERS, Config

    assert set(LR_SCHEDULERS) <= {s.value for s in SchedulerType}
    assert Config().lr_scheduler_type in LR_SCHEDULERS


def test_help_shows_the_bounds(capsys):
    from alignpipe.cli.main import main

    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    assert "max_steps = 300 (in [1, 10000000]):" in out and "learning_rate = 0.002 (> 0):" in out


# ------------------------------------------------------------------------------- params files refused at load

def test_a_typo_d_section_is_refused_naming_the_known_sections(tmp_path, capsys):
    from alignpipe.cli.main import main

    p = tmp_path / "params.yaml"
    p.write_text("pretrian:\n  max_steps: 5\n")
    for argv in (["config", "show"], ["pretrain"], ["pipeline", "compile", "--out", str(tmp_path / "p.yaml")],
                 ["pipeline", "trainjob", "--stage", "pretrain", "--out", str(tmp_path / "job.yaml")]):
        assert main([*argv, "--params", str(p)]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert f"{p}: pretrian: unknown section (did you mean pretrain?); sections: data," in err, argv
        assert "\n" not in err
    assert not (tmp_path / "p.yaml").exists() and not (tmp_path / "job.yaml").exists()


def test_duplicate_keys_are_refused_with_file_and_line(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("pretrain:\n  n_embd: 64\ndpo:\n  beta: 0.2\npretrain:\n  n_head: 2\n")
    with pytest.raises(ConfigError, match="line 5: duplicate key 'pretrain'") as e:
        load_params(p)
    assert e.value.where == str(p)
    p.write_text("dpo:\n  beta: 0.2\n  max_steps: 3\n  beta: 0.3\n")
    with pytest.raises(ConfigError, match="line 4: duplicate key 'beta'"):
        load_params(p)
    p.write_text("dpo: &d\n  beta: 0.2\norpo:\n  <<: *d\n  beta: 0.3\n")  # a merge key may be overridden
    assert load_params(p)["orpo"] == {"beta": 0.3}


def test_a_yaml_alias_bomb_is_refused_fast_and_small(tmp_path):
    """A "billion laughs" params file: 9 levels of 9 aliases (~4e8 values) refused in the loader, well within a
    second, without building the expanded value."""
    import time
    import tracemalloc

    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines) + "\npretrain:\n  n_embd: *a8\n")
    tracemalloc.start()
    t = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases expand to more than 100000 values"):
        load_params(p)
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 1 and peak < 50e6
    flow = "{" + ", ".join(lines) + ", z: *a8}"  # the same bomb as one --set value
    with pytest.raises(ConfigError, match="aliases expand"):
        apply_overrides({}, ["pretrain.n_embd=" + flow])
    p.write_text("pretrain: &r\n  n_embd: [*r]\n")
    with pytest.raises(ConfigError, match="recursive alias|nested too deep"):
        load_params(p)
