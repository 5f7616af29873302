"""benchmarks/budget_sweep.py without running anything: the 2x budget doubles every budget key of params.yaml and
nothing else, and each stage's command keeps every input and output inside the budget's work dir."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sweep():
    spec = importlib.util.spec_from_file_location("budget_sweep", ROOT / "benchmarks" / "budget_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_2x_overlay_doubles_the_budget_keys_and_keeps_the_rest(tmp_path, monkeypatch):
    from alignpipe.core.config import effective_params
    from alignpipe.stages import config_classes

    monkeypatch.chdir(ROOT)
    sweep = _sweep()
    default = effective_params("params.yaml", None, config_classes())
    doubled = effective_params(sweep.params_file("2x", tmp_path / "2x"), None, config_classes())
    for section, values in default.items():
        for key, (value, _) in values.items():
            want = 2 * value if f"{section}.{key}" in sweep.BUDGET_KEYS else value
            assert doubled[section][key][0] == want, f"{section}.{key}"


def test_stage_commands_stay_inside_the_work_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    sweep = _sweep()
    w = tmp_path / "default"
    for name in sweep.STAGES:
        argv = sweep.stage_argv(name, w, Path("params.yaml"))
        paths = [a for flag, a in zip(argv, argv[1:]) if flag.startswith("--") and "=" not in flag
                 and flag != "--params"] + [a.split("checkpoint_dir=", 1)[1] for a in argv if "checkpoint_dir=" in a]
        assert paths and all(p.startswith(str(w)) for p in paths), (name, argv)
        assert argv[-2:] == ["--out", str(w / name)]
    evaluate = sweep.stage_argv("evaluate", w, Path("params.yaml"))
    for candidate in ("--dpo", "--orpo", "--ppo", "--grpo", "--reward-model"):
        assert candidate in evaluate
