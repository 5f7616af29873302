"""`alignpipe`: one subcommand per stage (a thin adapter over `alignpipe.run.runner.execute`), plus `data build`,
`config show`, `pipeline compile|run|submit|dvc-yaml|trainjob` and `serve kserve-manifest`."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Sequence

from alignpipe.core.config import (DEFAULT_PARAMS, apply_overrides, build_config, config_keys, describe_constraints,
                                   effective_params, load_params, unflatten)
from alignpipe.core.errors import AlignpipeError, ConfigError
from alignpipe.core.redaction import redact_text
from alignpipe.stages import STAGE_HELP, STAGE_NAMES, config_classes, load_stage

DATA_FLAGS = ("dataset", "split", "task")  # `data build --dataset PATH_OR_ID [--split S] [--task T]`


def _config_epilog(cfg_cls) -> str:
    lines = [f"config keys (params section '{cfg_cls.SECTION}', override with --set {cfg_cls.SECTION}.KEY=VALUE):"]
    outer = {f.name: f for f in dataclasses.fields(cfg_cls)}
    groups_seen = set()
    for key, f, _, default in config_keys(cfg_cls):
        group, dot, _ = key.partition(".")
        if dot and group not in groups_seen:  # a group's line, then its keys
            groups_seen.add(group)
            lines.append(f"  {group}: {outer[group].metadata.get('help', '')}")
        bounds = describe_constraints(f)
        lines.append(f"  {key} = {default!r}{f' ({bounds})' if bounds else ''}: {f.metadata.get('help', '')}")
    return "\n".join(lines)


def _add_common(p: argparse.ArgumentParser, out_default: str) -> None:
    p.add_argument("--params", default=DEFAULT_PARAMS, help="params YAML file (default: %(default)s)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one params value (repeatable)")
    p.add_argument("--out", default=out_default, help="output directory (default: %(default)s)")


def _add_stage_parser(sub, name: str, help_text: str, out_default: str, command: str | None = None):
    stage = load_stage(name)
    p = sub.add_parser(command or name, help=help_text, description=(stage.__doc__ or help_text).strip(),
                       epilog=_config_epilog(stage.Config), formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(p, out_default)
    for spec in stage.INPUTS:
        flag = "--" + spec.name.replace("_", "-")
        p.add_argument(flag, dest=f"input_{spec.name}", default=spec.default,
                       help=f"{spec.help} (default: %(default)s)")
    if any(f.name == "resume" for f in dataclasses.fields(stage.Config)):
        p.add_argument("--resume", action="store_true", help="resume from the latest checkpoint")
    p.set_defaults(stage=name)
    return p


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; only the `chosen` command's stage module is imported (others get a one-line entry)."""
    parser = argparse.ArgumentParser(prog="alignpipe", description="Align language models with preferences: "
                                     + " -> ".join(["data", *STAGE_NAMES]) + ".")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help=STAGE_HELP["data"])
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    if chosen == "data":
        build = _add_stage_parser(data_sub, "data", "build data/ from the stdlib (pep8) or from --dataset", "data",
                                  command="build")
        for key in DATA_FLAGS:  # shorthands of --set data.KEY=VALUE
            build.add_argument(f"--{key}", dest=f"data_{key}", metavar=key.upper(),
                               help=f"the same as --set data.{key}={key.upper()} (see data.{key} below)")
    else:
        data_sub.add_parser("build", help="build data/ from the stdlib (pep8) or from --dataset")

    config = sub.add_parser("config", help="show the effective config of a params file and overrides")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser("show", help="every key of every stage: its value and where it came from "
                                              "(default, params.yaml, an overlay, --set)")
    show.add_argument("--params", default=DEFAULT_PARAMS, help="params YAML file (default: %(default)s)")
    show.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="override one params value (repeatable)")
    show.add_argument("--section", action="append", default=[], metavar="STAGE", help="only these sections")
    show.add_argument("--yaml", action="store_true",
                      help="print a complete, standalone params file instead (no overlay, every key; e.g. to mount "
                           "one file into a container)")
    show.set_defaults(func=cmd_config_show)

    for name in STAGE_NAMES:
        if name == chosen:
            _add_stage_parser(sub, name, STAGE_HELP[name], f"artifacts/{name}")
        else:
            sub.add_parser(name, help=STAGE_HELP[name])

    from alignpipe.cli.kfp import add_pipeline_parser

    add_pipeline_parser(sub)
    from alignpipe.cli.serve import add_serve_parser

    add_serve_parser(sub)
    return parser


def format_effective(effective: dict[str, dict[str, tuple]]) -> str:
    """`section.key = value  (origin)` lines, aligned, one block per section."""
    rows = [(f"{section}.{key}", repr(value), origin)
            for section, values in effective.items() for key, (value, origin) in values.items()]
    w0 = max((len(r[0]) for r in rows), default=0)
    w1 = max((len(r[1]) for r in rows), default=0)
    return "\n".join(f"{k:<{w0}} = {v:<{w1}}  ({o})" for k, v, o in rows)


def cmd_config_show(args: argparse.Namespace) -> int:
    known = config_classes()
    unknown = sorted(set(args.section) - set(known))
    if unknown:
        raise ConfigError(f"--section {unknown[0]}", f"no such stage; stages: {', '.join(known)}")
    effective = effective_params(args.params, args.sets, known)
    chosen = {s: v for s, v in effective.items() if not args.section or s in args.section}
    if args.yaml:
        import yaml

        print(yaml.safe_dump({s: unflatten({k: value for k, (value, _) in v.items()}) for s, v in chosen.items()},
                             sort_keys=False), end="")
    else:
        print(format_effective(chosen))
    return 0


def run_stage(args: argparse.Namespace) -> int:
    from alignpipe.run.runner import execute, input_limits

    known = config_classes()
    params = apply_overrides(load_params(args.params, known), args.sets, known)
    flags = {key: getattr(args, "data_" + key) for key in DATA_FLAGS if getattr(args, "data_" + key, None) is not None}
    if flags:  # taken as given (strings), not parsed as YAML like --set values
        params["data"] = {**params.get("data", {}), **flags}
    section = params.get(args.stage, {})
    if getattr(args, "resume", False):
        section = {**section, "resume": True}
    cfg = build_config(known[args.stage], {**params, args.stage: section})
    inputs = {k[len("input_"):]: v for k, v in vars(args).items() if k.startswith("input_")}
    metrics = execute(args.stage, cfg, inputs, args.out, input_limits(params))
    width = max((len(k) for k in metrics), default=0)
    print(f"{args.stage}: wrote {args.out}/")
    for k, v in metrics.items():
        print(f"  {k:<{width}}  {v:.6g}" if isinstance(v, float) else f"  {k:<{width}}  {v}")
    return 0


def pin_hash_seed() -> None:
    """Run this program again with PYTHONHASHSEED=0 when it is unset (before any work: the process is replaced).
    Python salts str hashes per process, so a library that lists a set of strings writes them in another order
    every run (TRL's model-card tags in the checkpoints); a fixed seed makes reruns write the same bytes."""
    if os.environ.get("PYTHONHASHSEED") is None:
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and os.path.basename(sys.argv[0]) == "alignpipe":  # the console script (`python -m`: __main__)
        pin_hash_seed()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    try:
        if args.command in ("pipeline", "config", "serve"):
            return args.func(args)
        return run_stage(args)
    except AlignpipeError as e:
        return _error_line(args, e)
    except KeyboardInterrupt:
        print("alignpipe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `alignpipe ... | head -1` closed stdout: nothing left to say, and no one to say it to
        _silence_stdout()
        return 141
    except Exception as e:
        from alignpipe.tracking.errors import store_error

        error = store_error(e)  # an unsupported or corrupt tracking URI, a refused registry call: one line
        if error is None:
            raise
        return _error_line(args, error)


def _error_line(args: argparse.Namespace, e: AlignpipeError) -> int:
    print(f"alignpipe {getattr(args, 'stage', args.command)}: error: {redact_text(str(e))}", file=sys.stderr)
    return e.exit_code


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file descriptor (captured): nothing to flush at exit
        pass


if __name__ == "__main__":
    sys.exit(main())
