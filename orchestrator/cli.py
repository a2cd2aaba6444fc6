"""The command line: ``orchestrator train | best`` (also ``python -m orchestrator``).

Exit codes: 0 success, 1 training failed, 2 bad input (one line on stderr, nothing started).
"""

from __future__ import annotations

import argparse
import json
import sys

from orchestrator.config import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, like every other bad input
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="orchestrator", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train one run on Ray Train")
    train.add_argument("config", help="YAML config file")
    train.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="override a config key (dotted), repeatable")
    again = train.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue an existing run of this name from its latest checkpoint")
    again.add_argument("--overwrite", action="store_true",
                       help="delete an existing run of this name and start afresh")

    best = sub.add_parser("best", help="print a run's best model and its metrics")
    best.add_argument("path", help="a run directory (local path or URI)")
    best.add_argument("--json", action="store_true", help="print summary.json as JSON")
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from orchestrator.config import load_config

    cfg = load_config(args.config, args.overrides)
    from orchestrator.report import print_summary
    from orchestrator.train import run_training

    summary = run_training(cfg, resume=args.resume, overwrite=args.overwrite)
    print_summary(summary)
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    from orchestrator import storage
    from orchestrator.report import print_summary
    from orchestrator.train import SUMMARY_FILE

    path = storage.join(storage.resolve(args.path), SUMMARY_FILE)
    if not storage.exists(path):
        raise UserError(f"{args.path}: no {SUMMARY_FILE} here; pass a finished run's directory")
    summary = storage.read_json(path)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"train": cmd_train, "best": cmd_best}[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from orchestrator.train import TrainingError

        if isinstance(exc, TrainingError):
            print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
            return 1
        raise
