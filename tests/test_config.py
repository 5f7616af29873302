"""Typed configs: params sections, --set overrides, and errors that name the key."""

from __future__ import annotations

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
    ("reward", "lr_scheduler", "lr_scheduler_type"),
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
