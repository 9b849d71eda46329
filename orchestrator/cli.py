"""The `unimo` command line: train, demo, model info, data tools, a local MLflow server, config checks.

Every entry is ``main(argv) -> int`` so tests drive the real CLI in-process.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from trainer.checkpoint import TornCheckpoint
from trainer.config_loader import ConfigError

DESCRIPTION = """unimo: distributed pre-training of UNIMO-family vision-language models
(Ray Train + DeepSpeed ZeRO-3 + WebDataset + MLflow).

Common commands:
  unimo demo                         synthetic data -> 2 Ray workers, ZeRO-3 -> checkpoints + MLflow
  unimo train debug model.fusion.layers=2 run.name=try1    (a shipped config's name, or a YAML file)
  unimo config list                               the shipped configs
  unimo config show debug                         print the resolved config
  unimo config show debug --doc                   ... with each key's documentation
  unimo check debug run.name=try1                 pre-flight: data, tokenizer, storage, tracking in seconds
  unimo model info base                           parameters and FLOPs per sample of a flavor
  unimo data shards --help                        write WebDataset shards
  unimo data preview unimo_recipe                 corpus shares of the first samples, epochs per corpus
  unimo mlflow                                    start a local MLflow tracking server + UI
  unimo submit base --address http://HEAD:8265 run.name=b1   run on a Ray cluster (Jobs API)
  unimo jobs list|status|logs [--follow]|stop JOB --address http://HEAD:8265
"""


def unimo_version() -> str:
    """The installed distribution's version (a checkout without an install reads pyproject.toml's)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("unimo")
    except PackageNotFoundError:
        import re

        text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
        match = re.search(r'^version = "([^"]+)"', text, re.M)
        return match.group(1) if match else "unknown"


# -v/--verbose is accepted before and after the subcommand; SUPPRESS keeps a subparser's default from
# overwriting a -v given before the subcommand.
VERBOSE = argparse.ArgumentParser(add_help=False)
VERBOSE.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a shipped config's name (debug, small, base, large, xl; "
                                  "`unimo config list`) or a YAML file, e.g. configs/debug.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="dotted overrides applied on top of the file, e.g. model.fusion.layers=2 "
                        "run.name=exp1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unimo", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"unimo {unimo_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_parser = sub.add_parser

    def add(name, **kwargs):  # every subcommand takes -v too
        return add_parser(name, parents=[VERBOSE], **kwargs)

    sub.add_parser = add

    p = sub.add_parser("train", help="train (or resume) a run on an embedded local Ray or a cluster",
                       description="Train the run named by run.name; if it exists in run.storage, resume it "
                                   "from its newest valid checkpoint. Without scaling.address an embedded "
                                   "Ray on 127.0.0.1 is started. The pre-flight checks of `unimo check` run "
                                   "first.")
    _add_config_args(p)
    p.add_argument("--dry-run", action="store_true",
                   help="run the pre-flight checks only (as `unimo check`), start nothing")

    p = sub.add_parser("check", help="pre-flight: check a run's config, data, tokenizer, storage, tracking",
                       description="Checks in seconds, before any worker starts, what a run would otherwise "
                                   "find out late: data sources list their shards and read a first sample, "
                                   "the tokenizer against the model, run storage "
                                   "writable, tracking reachable with its credentials, a resumed checkpoint "
                                   "against the config, GPUs. Prints a table; exits 1 at the first error.")
    _add_config_args(p)

    p = sub.add_parser("demo", help="end-to-end demo on a synthetic captioned data set",
                       description="Writes a small synthetic data set (pairs, unpaired text, unpaired "
                                   "images) as WebDataset shards, trains the debug flavor with 2 Ray Train "
                                   "workers under DeepSpeed ZeRO-3, checkpoints, logs to a local MLflow "
                                   "store, and prints where to look.")
    p.add_argument("--out", default="demo_out", help="folder for the data, checkpoints and MLflow store")
    p.add_argument("--config", default=None, help="config name or file (default: the shipped debug config)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="dotted config overrides")

    p = sub.add_parser("config", help="inspect configs")
    csub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    csub.add_parser("list", parents=[VERBOSE], help="the shipped configs, with where they live")
    show = csub.add_parser("show", parents=[VERBOSE],
                           help="print the resolved config (defaults <- file <- overrides)")
    _add_config_args(show)
    show.add_argument("--doc", action="store_true",
                      help="each key with its documentation, as written where the field is declared")

    p = sub.add_parser("model", help="model tools")
    msub = p.add_subparsers(dest="model_command", metavar="SUBCOMMAND")
    info = msub.add_parser("info", parents=[VERBOSE],
                           help="parameters per part and FLOPs per sample of a flavor")
    info.add_argument("flavor", help="debug, small, base, large or xl")

    p = sub.add_parser("data", help="data tools (shards, tokenizer); see `unimo data --help`", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)

    # submit and jobs parse their own arguments (orchestrator/jobs.py): options may follow the overrides
    # there.
    p = sub.add_parser("submit", help="submit a run to a Ray cluster (Jobs API); see `unimo submit --help`",
                       add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    p = sub.add_parser("jobs", aliases=["job"], add_help=False,
                       help="list, status, logs [--follow], stop jobs on a Ray cluster; "
                            "see `unimo jobs --help`")
    p.add_argument("args", nargs=argparse.REMAINDER)

    p = sub.add_parser("export", help="consolidate a checkpoint into safetensors + config + tokenizer",
                       description="Reads the weights of a checkpoint folder (one with a valid "
                                   "manifest) and writes model.safetensors, config.json and tokenizer.json "
                                   "to OUT, loadable with trainer.export.load_exported without DeepSpeed.")
    p.add_argument("checkpoint", help="a checkpoint folder, e.g. runs/exp1/checkpoints/step_00000300")
    p.add_argument("out", help="output folder")
    p.add_argument("--format", choices=("unimo", "hf"), default="unimo",
                   help="hf: also OUT/text (a BERT/RoBERTa folder + tokenizer) and OUT/vision (a "
                        "ViT/CLIP-vision folder + image processor) that transformers' AutoModel loads")

    from orchestrator.eval_cli import add_parser as add_eval_parser

    add_eval_parser(sub)

    p = sub.add_parser("mlflow", help="start a local MLflow tracking server (SQLite backend) on 127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--backend-store-uri", default="sqlite:///runs/mlflow.db")
    p.add_argument("--workers", type=int, default=1,
                   help="server worker processes (default 1: enough for one job's batched logging, "
                        "starts fast)")
    p.add_argument("--artifacts-destination", default="./runs/mlartifacts",
                   help="local folder or s3://bucket/prefix for artifacts")
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from orchestrator.driver import exit_code, fit, print_summary
    from trainer.config import load_config

    if args.dry_run:
        return cmd_check(args)
    cfg = load_config(args.config, args.overrides)
    outcome = fit(cfg)
    print_summary(outcome)
    return exit_code(outcome)  # 75 when preempted: resubmit


def cmd_check(args: argparse.Namespace) -> int:
    """The pre-flight table; the first error ends it (rc 1) with its one-paragraph message."""
    import time

    from orchestrator.preflight import TABLE_HEADER, PreflightError, print_check, run_preflight
    from trainer.config import load_config

    started = time.monotonic()
    cfg = load_config(args.config, args.overrides)
    print(TABLE_HEADER, flush=True)
    try:
        report = run_preflight(cfg, on_check=print_check)
    except PreflightError as err:
        print(f"unimo check: FAILED after {time.monotonic() - started:.1f} s\nunimo: error: {err}",
              file=sys.stderr)
        return 1
    warned = f", {len(report.warnings)} warning(s)" if report.warnings else ""
    print(f"unimo check: {len(report.checks)} checks passed{warned} in {time.monotonic() - started:.1f} s")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from orchestrator.demo import run_demo

    return run_demo(args.out, args.config, args.overrides)


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from trainer.config import load_config
    from trainer.config_loader import to_dict

    if args.config_command == "list":
        from trainer import shipped_configs

        folder = shipped_configs.shipped_dir()
        for name in shipped_configs.shipped_names():
            print(f"{name:8s} {folder / (name + '.yaml')}")
        return 0
    if args.config_command != "show":
        print("usage: unimo config list | unimo config show CONFIG [overrides]", file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.overrides)
    if args.doc:
        from trainer.config_docs import render

        print(render(cfg), end="")
        return 0
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    if args.model_command != "info":
        print("usage: unimo model info FLAVOR", file=sys.stderr)
        return 2
    from model.flops import model_info

    print(model_info(args.flavor))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from data_pipeline.cli import main as data_main

    from trainer import shipped_configs

    # `unimo data preview debug` as `unimo train debug`: a shipped config name resolves as for train
    return data_main(args.args, resolve_config=shipped_configs.resolve)


def cmd_submit(args: argparse.Namespace) -> int:
    from orchestrator.jobs import submit_main

    return submit_main(args.args)


def cmd_jobs(args: argparse.Namespace) -> int:
    from orchestrator.jobs import jobs_main

    return jobs_main(args.args)


def cmd_export(args: argparse.Namespace) -> int:
    import tempfile

    from trainer import storage
    from trainer.checkpoint import checked_local_copy
    from trainer.export import export_checkpoint

    if not storage.is_remote(args.checkpoint):
        out = export_checkpoint(args.checkpoint, args.out, fmt=args.format)
    else:  # an s3:// checkpoint: verified in a temporary local copy, then exported from it
        with tempfile.TemporaryDirectory(prefix="unimo-export-") as tmp:
            local = checked_local_copy(args.checkpoint, Path(tmp))
            out = export_checkpoint(local, args.out, source=args.checkpoint, fmt=args.format)
    print(f"exported {args.checkpoint} -> {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from orchestrator.eval_cli import main as eval_main

    return eval_main(args)


def cmd_mlflow(args: argparse.Namespace) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow 3 starts a pool of job-runner processes (GenAI evaluation, prompt optimisation) with every
    # server; experiment tracking needs none of them, and on a small head node they cost ~35 s of CPU at
    # start-up. A user who wants them sets MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    argv = [sys.executable, "-m", "mlflow", "server", "--host", args.host, "--port", str(args.port),
            "--backend-store-uri", args.backend_store_uri,
            "--artifacts-destination", args.artifacts_destination, "--workers", str(args.workers)]
    print(f"MLflow UI: http://{args.host}:{args.port}  (tracking.uri=http://{args.host}:{args.port})",
          flush=True)
    os.execv(sys.executable, argv)
    return 0  # not reached


COMMANDS = {"train": cmd_train, "demo": cmd_demo, "config": cmd_config, "model": cmd_model,
            "data": cmd_data, "mlflow": cmd_mlflow, "submit": cmd_submit, "jobs": cmd_jobs, "job": cmd_jobs,
            "export": cmd_export, "eval": cmd_eval}
COMMANDS["check"] = cmd_check


# Commands that parse their own arguments: argparse's REMAINDER drops a leading option (`unimo submit --help`,
# `unimo jobs list --address ...`), so everything after the command's name is handed over verbatim.
PASSTHROUGH = ("data", "submit", "jobs", "job")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if first is not None and argv[first] in PASSTHROUGH:
        args = parser.parse_args(argv[:first + 1])
        rest = argv[first + 1:]
        # -v/--verbose after the command is unimo's, as for every other command (these parsers have none).
        args.args = [a for a in rest if a not in ("-v", "--verbose")]
        if len(args.args) != len(rest):
            args.verbose = True
        return args
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except ConfigError as err:
        print(f"unimo: config error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError, TornCheckpoint) as err:
        print(f"unimo: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
