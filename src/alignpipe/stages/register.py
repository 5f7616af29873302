"""Register the best evaluated policy (and the reward model) in the MLflow model registry, behind a quality gate.

The policy becomes a new version of `alignpipe-policy` (transformers flavor, text-generation) that serves plain
prompt strings: the prompt template applies the policy's conditioning (e.g. the `<|aligned|>` suffix), and the
generation settings (sampling, `max_new_tokens`, banned `<|misaligned|>`) are in its model_config. Its
alignpipe.json travels in the MLmodel metadata so evaluate can reload the champion as a policy directory
(`alignpipe.tracking.policies.champion_policy`).
The `champion` alias moves to the new version only when it beats the current champion on the gate metric
(`register.metric` and `direction`, by default the task's as evaluate recorded it: pep8, oracle violations/char,
lower is better; chat, the judge's win rate against the reference, higher is better) by `margin`, both measured in
the same evaluation (evaluate samples the registered champion on the candidates' prompts: report["champion"]); when the report has no such measurement of the
current champion the alias stays where it was and the reason is printed. The policy is evaluate's `best/` (the chosen
candidate with candidate.json, its report entry). The weights registered must be the ones evaluated: a `best/`
whose safetensors sha256 differs from the one in candidate.json is refused with one line and a non-zero exit,
before anything is registered. Each alias move is recorded in the registry: tags on the
old and new versions and a line (when, from, to, why, metrics) in the registered model's description.
The reward model becomes a new version of `alignpipe-reward` (text-classification, raw score).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from alignpipe.core.config import ALIAS, MAX_BATCH, MAX_TOKENS, MODEL_NAME, StageConfig, field
from alignpipe.reports.candidates import BEST_FILE, check_weights, read_report
from alignpipe.tasks import DEFAULT_TASK, get_task
from alignpipe.stages import Input
from alignpipe.tracking.policies import POLICY_ONNX_NAME

INPUTS = (
    Input("best", "artifacts/evaluate/best", "evaluate's best/: the chosen policy with candidate.json (its name, "
          "metrics and weights sha256)"),
    Input("reward_model", "artifacts/reward", "reward model, registered as the reward model name", False),
    Input("export", "artifacts/export", "export output: its ONNX models are registered alongside", False),
)
METRICS = ("registered_version", "champion_moved")
# The few metrics `dvc metrics show` lists (metrics_headline.json; fnmatch patterns); metrics.json has all.
HEADLINE = ("registered_version", "champion_moved")

SERVING_PACKAGES = ("transformers", "torch", "tokenizers", "safetensors")


@dataclass(frozen=True)
class Config(StageConfig):
    SECTION: ClassVar[str] = "register"

    model_name: str = field("alignpipe-policy", "registered model name of the policy", pattern=MODEL_NAME)
    reward_model_name: str = field("alignpipe-reward", "registered model name of the reward model", pattern=MODEL_NAME)
    alias: str = field("champion", "alias that marks the version to serve", pattern=ALIAS)
    margin: float = field(0.0, "relative improvement in the gate metric needed to move the alias: moves when "
                          "new < champion * (1 - margin) (lower is better) or new > champion * (1 + margin) (higher)",
                          ge=0, lt=1)
    metric: str = field("", "gate metric (a per-candidate key of evaluate's report); empty: the task's, as evaluate "
                        "recorded it (pep8: violations_per_char; chat: judge_win_rate_vs_ref)")
    direction: str = field("", "lower or higher (is better) for the gate metric; empty: the task's",
                           choices=("", "lower", "higher"))
    max_new_tokens: int = field(48, "serving: cap on generated tokens per request (a request may lower it)",
                                ge=1, le=MAX_TOKENS)
    temperature: float = field(0.7, "serving: sampling temperature (PHF: 0.7)", gt=0)
    top_p: float = field(0.9, "serving: nucleus sampling p (PHF: 0.9)", gt=0, le=1)
    serve_max_batch_size: int = field(16, "ONNX serving model: most prompts (or reward pairs) decoded together",
                                      ge=1, le=MAX_BATCH)
    serve_batch_window_ms: float = field(5.0, "ONNX serving model: how long a request waits for others to batch "
                                              "with", ge=0, le=60_000)
    register_reward: bool = field(True, "also register the reward model (when --reward-model is given)")
    reward_hacking_guard: bool = field(True, "refuse to move the alias to a candidate evaluate flags as reward "
                                             "hacking (RM reward up, oracle not better; alignpipe.oracle.guard)")


def gate(candidate: float, champion: float | None, margin: float, metric: str = "the gate metric",
         higher: bool = False) -> tuple[bool, str]:
    """(move the alias?, why): move when there is no champion or `candidate < champion * (1 - margin)` (lower is
    better; `higher`: `candidate > champion * (1 + margin)`)."""
    if champion is None:
        return True, "no champion yet"
    if not math.isfinite(candidate):
        return False, f"candidate {metric} is not finite ({candidate})"
    bar = champion * (1 + margin) if higher else champion * (1 - margin)
    if candidate > bar if higher else candidate < bar:
        return True, (f"{metric} {candidate:.6g} {'>' if higher else '<'} {bar:.6g} (champion {champion:.6g}, "
                      f"margin {margin:g})")
    return False, f"{metric} {candidate:.6g} does not beat {bar:.6g} (champion {champion:.6g}, margin {margin:g})"


def gate_rule(cfg: Config, report: dict[str, Any]) -> tuple[str, bool]:
    """(gate metric, higher is better): register's settings, else the task's gate as evaluate recorded it (reports
    from before tasks: the pep8 task's `gate()`)."""
    metric = cfg.metric or report.get("gate_metric")
    direction = cfg.direction or (report.get("gate_direction") if metric == report.get("gate_metric") else "")
    if not metric:
        metric, higher = get_task(DEFAULT_TASK).gate()
        return metric, direction == "higher" if direction else higher
    return metric, (direction or "lower") == "higher"


def champion_score(report: dict[str, Any], champion: dict[str, Any], metric: str) -> tuple[float | None, str]:
    """The current champion's gate metric as measured in this evaluation (same prompts, seed and sampling as the
    candidate), or (None, why not). A value from another evaluation is never used: its prompts differ."""
    measured = report.get("champion") or {}
    value = measured.get(metric)
    if not measured:
        return None, (f"this evaluation measured no champion (it ran before version {champion['version']} became "
                      "champion): re-run evaluate to compare on the same prompts")
    if str(measured.get("version")) != champion["version"]:
        return None, (f"this evaluation measured version {measured.get('version')}, not the current champion "
                      f"version {champion['version']}: re-run evaluate")
    if not isinstance(value, (int, float)):
        return None, f"this evaluation has no {metric} for the champion"
    return float(value), "measured in this evaluation"


def decide(cfg: Config, report: dict[str, Any], name: str, champion: dict[str, Any] | None
           ) -> tuple[bool, str, float, float | None]:
    """(move the alias?, why, candidate value, champion value): the gate on same-evaluation numbers, then the
    reward-hacking guard."""
    metrics = report["candidates"][name]
    metric, higher = gate_rule(cfg, report)
    champion_value, source = champion_score(report, champion, metric) if champion else (None, "")
    candidate_value = metrics.get(metric)
    candidate_value = float(candidate_value) if isinstance(candidate_value, (int, float)) else math.nan
    if champion is not None and champion_value is None:
        move = False
        why = f"cannot compare with {cfg.model_name}@{cfg.alias} (version {champion['version']}): {source}"
    else:
        move, why = gate(candidate_value, champion_value, cfg.margin, metric, higher)
        if champion is not None:
            why += f"; champion value {source}"
    hacked = (metrics.get("guard") or {}).get("reward_hacking")
    if move and hacked and cfg.reward_hacking_guard:
        from alignpipe.oracle.guard import verdict_line

        move, why = False, f"refused by the reward-hacking guard: {verdict_line(name, metrics['guard'])}"
    return move, why, candidate_value, champion_value


def serving_settings(cfg: Config, model, tok, meta) -> tuple[str, dict[str, Any]]:
    """(prompt_template, model_config) that make the served pipeline prompt and sample like `alignpipe.lm.policy`:
    the conditioning around the prompt, the last `max_prompt_tokens` prompt tokens kept (the tokenizer must
    truncate on the left), PHF sampling, banned tokens."""
    from alignpipe.lm.models import context_length
    from alignpipe.lm.policy import Sampling, banned_token_ids

    def escape(text: str) -> str:
        return text.replace("{", "{{").replace("}", "}}")

    template = escape(meta.prompt_prefix) + "{prompt}" + escape(meta.prompt_suffix)
    bad = [[i] for i in banned_token_ids(tok, meta)]
    context = context_length(model) or 10**9
    max_prompt = min(Sampling().max_prompt_tokens, context - cfg.max_new_tokens)
    if max_prompt < 1:
        from alignpipe.core.errors import ConfigError

        raise ConfigError("register.max_new_tokens", f"{cfg.max_new_tokens} leaves no room for a prompt in the "
                          f"model's context of {context} tokens")
    config = {"max_new_tokens": cfg.max_new_tokens, "do_sample": True, "temperature": cfg.temperature,
              "top_p": cfg.top_p, "top_k": 0, "return_full_text": False, "truncation": True,
              "tokenizer_encode_kwargs": {"max_length": max_prompt}}
    if bad:
        config["bad_words_ids"] = bad
    return template, config


def _metric_tags(prefix: str, metrics: dict[str, Any]) -> dict[str, str]:
    return {f"{prefix}.{k}": f"{v:.6g}" if isinstance(v, float) else str(v)
            for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _read_metrics(directory: Path) -> dict[str, Any]:
    path = directory / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def register_policy(cfg: Config, policy_dir: Path, tags: dict[str, str]) -> str:
    """Log and register the policy in `policy_dir` as a new version of `cfg.model_name`; returns the version."""
    from alignpipe.lm.policy import load_policy
    from alignpipe.tracking import registry

    # An absolute path: MLflow looks a relative `name_or_path` up on the Hugging Face Hub for a model card.
    model, tok, meta = load_policy(policy_dir.resolve(), device="cpu")
    template, model_config = serving_settings(cfg, model, tok, meta)
    # Long prompts keep their end (and the conditioning suffix), as in sampling; init_kwargs is what gets saved.
    tok.truncation_side = tok.init_kwargs["truncation_side"] = "left"
    meta_dict = json.loads((policy_dir / "alignpipe.json").read_text()) if (policy_dir / "alignpipe.json").is_file() \
        else {"objective": meta.objective}
    signature = registry.text_signature(
        "def add(a, b):", ["\n    return a + b"],
        params={"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
                "do_sample": True})
    version = registry.log_transformers_model(
        {"model": model, "tokenizer": tok}, name="policy", task="text-generation",
        registered_model_name=cfg.model_name, signature=signature, prompt_template=template,
        model_config=model_config, pip_requirements=registry.pip_requirements(*SERVING_PACKAGES),
        metadata={"alignpipe": meta_dict})
    registry.set_model_version_tags(cfg.model_name, version, tags)
    return version


def register_reward(cfg: Config, reward_dir: Path, tags: dict[str, str]) -> str:
    """Log and register the reward model as a new version of `cfg.reward_model_name` (raw scores, no sigmoid)."""
    from alignpipe.lm.reward_model import load_reward_model
    from alignpipe.tracking import registry

    model, tok = load_reward_model(reward_dir.resolve(), device="cpu")
    version = registry.log_transformers_model(
        {"model": model, "tokenizer": tok}, name="reward", task="text-classification",
        registered_model_name=cfg.reward_model_name, model_config={"function_to_apply": "none"},
        pip_requirements=registry.pip_requirements(*SERVING_PACKAGES))
    registry.set_model_version_tags(cfg.reward_model_name, version,
                                    {**tags, **_metric_tags("reward", _read_metrics(reward_dir))})
    return version


def run(cfg: Config, inputs: dict[str, Path | None], out_dir: Path) -> dict[str, float]:
    from alignpipe.tracking import registry, runs
    from alignpipe.core.io import write_json

    policy_dir = Path(inputs["best"])
    report = read_report(policy_dir, BEST_FILE)
    name = report["best_candidate"]
    weights = check_weights(report, name, policy_dir, str(policy_dir / BEST_FILE))
    metrics = report["candidates"][name]
    # Everything that can refuse the run does so before the first version is registered: no half-written registry.
    registry.check_model_names(cfg.model_name, cfg.reward_model_name)
    onnx_sha256 = _check_onnx(inputs.get("export"), inputs.get("reward_model") if cfg.register_reward else None)
    champion = registry.model_version_by_alias(cfg.model_name, cfg.alias)
    move, why, candidate_value, champion_value = decide(cfg, report, name, champion)

    common = {"alignpipe.data_version": runs.data_version(), "alignpipe.git_commit": runs.git_commit()}
    reward_version = None
    if cfg.register_reward and inputs.get("reward_model") is not None:
        reward_version = register_reward(cfg, Path(inputs["reward_model"]), common)
    tags = {**common, "alignpipe.candidate": name, "alignpipe.source_path": str(policy_dir),
            "alignpipe.objective": str(metrics.get("objective", "")),
            "alignpipe.gate": ("promoted: " if move else "kept previous champion: ") + why,
            "alignpipe.eval_prompts": f"{report.get('prompts', {}).get('path')} "
                                      f"(n={report.get('prompts', {}).get('n')})",
            "alignpipe.eval_prompts_sha256": str(report.get("prompts", {}).get("sha256")),
            "alignpipe.weights_sha256": weights,
            **{f"params.{k}": str(v) for k, v in cfg.to_dict().items()},
            **_metric_tags("eval", metrics), **_metric_tags("train", _read_metrics(policy_dir))}
    if reward_version is not None:
        tags["alignpipe.reward_version"] = reward_version
    version = register_policy(cfg, policy_dir, tags)
    if move:
        registry.set_model_alias(cfg.model_name, cfg.alias, version)
        registry.record_alias_move(cfg.model_name, cfg.alias, champion["version"] if champion else None, version,
                                   why, {"candidate": name, gate_rule(cfg, report)[0]: candidate_value,
                                         f"champion_{gate_rule(cfg, report)[0]}": champion_value,
                                         "win_rate_vs_champion": metrics.get("win_rate_vs_champion")})
        if reward_version is not None:
            registry.set_model_alias(cfg.reward_model_name, cfg.alias, reward_version)
    champion_after = version if move else (champion["version"] if champion else None)  # None: still no champion

    onnx = _register_onnx(inputs.get("export"), version, reward_version, cfg, policy_dir,
                          inputs.get("reward_model"), move, report.get("task", DEFAULT_TASK), onnx_sha256)
    record = {"policy_name": cfg.model_name, "version": version, "candidate": name, "source_path": str(policy_dir),
              "alias": cfg.alias, "champion_before": champion["version"] if champion else None,
              "champion_after": champion_after, "champion_moved": move, "gate": why,
              "candidate_value": candidate_value, "champion_value": champion_value,
              "reward_name": cfg.reward_model_name if reward_version else None, "reward_version": reward_version,
              "onnx_versions": onnx, "model_uri": f"models:/{cfg.model_name}@{cfg.alias}"}
    write_json(out_dir / "registered.json", record)
    verdict = (f"{cfg.alias} -> version {version}" if move else
               (f"{cfg.alias} stays at version {champion_after}" if champion_after else f"no {cfg.alias} yet")
               + f"; version {version} registered without the alias")
    print(f"register: {cfg.model_name} version {version} ({name}); {verdict} ({why})")
    uri = runs.redact(runs.tracking_uri())
    if onnx and POLICY_ONNX_NAME in onnx:
        print(f"serve:    MLFLOW_TRACKING_URI={uri} alignpipe serve models:/{POLICY_ONNX_NAME}@{cfg.alias}")
    else:
        print(f"serve:    MLFLOW_TRACKING_URI={uri} mlflow models serve -m models:/{cfg.model_name}@{cfg.alias} "
              "--env-manager local -p 5001")
    out = {"registered_version": int(version), "champion_moved": int(move),
           "champion_version": int(champion_after or 0)}  # 0: no champion
    if reward_version is not None:
        out["reward_registered_version"] = int(reward_version)
    return out


def _check_onnx(export_dir: Path | None, reward_dir: Path | None) -> dict[str, str] | None:
    """The sha256 of the export folder's graphs, each checked (`tracking.policies.check_onnx_exports`), when
    --export is given; None otherwise."""
    if export_dir is None:
        return None
    from alignpipe.core.errors import DataError
    from alignpipe.tracking.policies import check_onnx_exports

    if reward_dir is None:
        raise DataError("--export", "the ONNX models are linked to a reward model version: give --reward-model "
                        "(and keep register.register_reward)")
    return check_onnx_exports(export_dir)


def _register_onnx(export_dir: Path | None, version: str, reward_version: str | None, cfg: Config,
                   policy_dir: Path, reward_dir: Path | None, move: bool, task: str,
                   sha256: dict[str, str] | None = None) -> dict | None:
    """Register the export stage's ONNX graphs, wrapped in batching onnxruntime pyfunc serving models, linked to
    these versions (when --export is given); their `alias` moves with the policy's. The policy's serving model is
    the evaluated `task`'s: prompt strings in (pep8), or a chat-completions request of messages in (chat)."""
    if export_dir is None:
        return None
    from alignpipe.core.errors import DataError
    from alignpipe.tracking import registry
    from alignpipe.tracking.policies import register_onnx
    from alignpipe.serving.models import log_policy_model, log_reward_model

    if reward_version is None or reward_dir is None:
        raise DataError("--export", "the ONNX models are linked to a reward model version: give --reward-model")
    batching = {"max_batch_size": cfg.serve_max_batch_size, "batch_window_ms": cfg.serve_batch_window_ms}
    _, model_config = serving_settings(cfg, *_policy_for_settings(policy_dir))
    serving = {
        "policy": log_policy_model(Path(export_dir) / "policy.onnx", policy_dir, {
            **batching, "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
            "max_prompt_tokens": model_config["tokenizer_encode_kwargs"]["max_length"]}, task=task),
        "reward": log_reward_model(Path(export_dir) / "reward.onnx", reward_dir, {**batching,
                                                                                **_reward_settings(reward_dir)})}
    versions = register_onnx(export_dir, version, reward_version, registry.client(),
                             policy_name=cfg.model_name, reward_name=cfg.reward_model_name, serving=serving,
                             logged_sha256=sha256)
    if move:
        for name, mv in versions.items():
            registry.set_model_alias(name, cfg.alias, mv.version)
    return {name: str(mv.version) for name, mv in versions.items()}


def _policy_for_settings(policy_dir: Path):
    from alignpipe.lm.policy import load_policy

    return load_policy(policy_dir.resolve(), device="cpu")


def _reward_settings(reward_dir: Path) -> dict[str, int]:
    """What the served reward model needs from the PyTorch one (`alignpipe.serving.models.reward_settings`)."""
    from alignpipe.serving.models import reward_settings

    return reward_settings(json.loads((Path(reward_dir) / "config.json").read_text()))
