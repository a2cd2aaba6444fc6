"""The command line: ``orchestrator train | tune | best | card | export | predict`` (also
``python -m orchestrator``).

Exit codes: 0 success, 1 training failed, 2 bad input (one line on stderr, nothing started).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import shlex
import signal
import sys
from typing import NoReturn

from orchestrator.errors import TrainingError, UserError
from workers.contract.names import LEADERBOARD_FILE, SUMMARY_FILE


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line and exit 2, like every other bad input
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_run_arguments(parser: argparse.ArgumentParser, *, resume: str, overwrite: str) -> None:
    """CONFIG, --set and the explicit choice for an existing run: shared by train and tune."""
    parser.add_argument("config", help="YAML config file, or a built-in config's name "
                        "(e.g. digits; a wrong name lists them)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key (dotted), repeatable")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help=resume)
    again.add_argument("--overwrite", action="store_true", help=overwrite)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show Ray's own output (start-up, controller and worker logs)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="orchestrator", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    add_run_arguments(
        sub.add_parser("train", help="train one run on Ray Train"),
        resume="continue an existing run of this name from its latest checkpoint",
        overwrite="delete an existing run of this name and start afresh",
    )
    add_run_arguments(
        sub.add_parser("tune", help="run a Ray Tune search over tune.search_space"),
        resume="continue an interrupted search: finished trials are not rerun",
        overwrite="delete an existing search of this name and start afresh",
    )

    best = sub.add_parser("best", help="print a run's best model, or a search's leaderboard")
    best.add_argument("path", help="a run or search directory (local path or URI)")
    best.add_argument("--json", action="store_true",
                      help="print summary.json (a run) or leaderboard.json (a search)")

    card = sub.add_parser("card", help="(re)write a run's or search's model_card.md from its "
                          "record, and print its path")
    card.add_argument("path", help="a run or search directory (local path or URI)")

    exp = sub.add_parser("export", help="write the best model as a torch.export program or "
                         "ONNX, checked against the saved weights on the validation split")
    exp.add_argument("path", help="a run or search directory (local path or URI)")
    exp.add_argument("--format", choices=("export", "onnx"), default="export",
                     help="export: <path>/export/model.pt2 (default); onnx: model.onnx "
                     "(needs the onnx extra)")
    exp.add_argument("--monitor", help="the best model of this tracker.also_monitor metric")

    pred = sub.add_parser("predict", help="batch inference with the best model as a Ray Data "
                          "job: Parquet (or the workload's val/test split) in, Parquet out")
    pred.add_argument("path", metavar="RUN", help="a run or search directory (local path or URI)")
    rows = pred.add_mutually_exclusive_group(required=True)
    rows.add_argument("--data", metavar="URI", help="Parquet file(s) to predict: a local path "
                      "or a URI (s3://, gs://, file://)")
    rows.add_argument("--split", choices=("val", "test"), help="the workload's own split")
    pred.add_argument("--out", metavar="URI", required=True, help="where the Parquet "
                      "predictions go: a new or empty directory, or an earlier --out")
    pred.add_argument("--batch-size", type=int, default=256, help="rows per model call "
                      "(default 256)")
    pred.add_argument("--actors", type=int, default=2, help="actors in the pool, each loading "
                      "the model once (default 2)")
    pred.add_argument("--gpu", action="store_true", help="one GPU per actor")
    pred.add_argument("--monitor", help="the best model of this tracker.also_monitor metric")
    pred.add_argument("-v", "--verbose", action="store_true",
                      help="also show Ray's own output")
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from orchestrator.api import train

    summary = train(args.config, args.overrides, resume=args.resume, overwrite=args.overwrite,
                    verbose=args.verbose)
    from orchestrator.cli.tables import print_summary

    print_summary(summary.record)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from orchestrator.api import tune

    result = tune(args.config, args.overrides, resume=args.resume, overwrite=args.overwrite,
                  verbose=args.verbose)
    from orchestrator.cli.tables import print_leaderboard

    print_leaderboard(result.record)
    # A signal raised TrainingError (130/143) before this: a trial left unfinished here, or
    # one that failed, is a search that did not end well (1), not an interrupt.
    statuses = {row["status"] for row in result.trials}
    return 1 if statuses & {"interrupted", "error"} else 0


def cmd_best(args: argparse.Namespace) -> int:
    from orchestrator import storage
    from orchestrator.cli.tables import print_leaderboard, print_summary
    from orchestrator.results.checkpoints import verify_checkpoint

    root = storage.resolve(args.path)
    problem = storage.unreachable(root) if storage.is_uri(root) else None
    if problem:  # unreachable, unauthorised, no such bucket: as train and tune say it
        raise UserError(f"{args.path} cannot be reached ({problem[:200]}); check the URI, "
                        "the credentials and the network")
    for name, show in ((LEADERBOARD_FILE, print_leaderboard), (SUMMARY_FILE, print_summary)):
        path = storage.join(root, name)
        if not storage.exists(path):
            continue

        def damaged(exc: Exception, path: str = path) -> UserError:
            return UserError(f"{path}: damaged, not the record this tool writes "
                             f"({type(exc).__name__}: {exc}); run the `train` or `tune` "
                             "command again with --resume to write it again")

        try:
            record = storage.read_json(path)
            best = record.get("best_model") or record.get("best_checkpoint")
        except (ValueError, AttributeError) as exc:  # not JSON, or not an object
            raise damaged(exc) from None
        problem = verify_checkpoint(best) if best else None
        if problem:
            raise UserError(f"{best}: the best model is damaged: {problem}")
        if args.json:
            print(json.dumps(record, indent=2))
            return 0
        try:
            show(record)
        except (KeyError, TypeError, AttributeError) as exc:  # JSON, but not our shape
            raise damaged(exc) from None
        return 0
    raise UserError(f"{args.path}: no {SUMMARY_FILE} or {LEADERBOARD_FILE} here; pass a "
                    "finished run's or search's directory")


def cmd_card(args: argparse.Namespace) -> int:
    from orchestrator.results.card import write_card

    print(write_card(args.path))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from orchestrator.api import export

    result = export(args.path, args.format, monitor=args.monitor)
    record = result.record
    print(f"exported {record['source_checkpoint']} (epoch {record['epoch']}) to {result.file}")
    print(f"check: max abs diff {result.max_abs_diff:.3g} over {record['rows']} validation rows "
          f"({record['batches']} batches; tolerance atol {record['tolerance']['atol']:g} + "
          f"rtol {record['tolerance']['rtol']:g})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from orchestrator.api import predict

    predict(args.path, args.data, args.split, args.out, batch_size=args.batch_size,
            num_actors=args.actors, use_gpu=args.gpu, monitor=args.monitor,
            verbose=args.verbose)  # its last line says rows, seconds, rows/s and --out
    return 0


def resume_command(args: argparse.Namespace) -> str:
    """The command that continues this run or search where it stopped."""
    sets = [part for item in args.overrides for part in ("--set", item)]
    return shlex.join(["orchestrator", args.command, args.config, *sets, "--resume"])


def install_stack_dumps() -> None:
    """``kill -USR1 <pid>`` of a driver that seems stuck prints every thread's stack to its
    stderr, and the run goes on. Nothing where there is no SIGUSR1, or no stderr file
    descriptor (``main`` called with its output captured in memory)."""
    if not hasattr(signal, "SIGUSR1"):
        return
    try:
        # typeshed refuses None, which faulthandler takes as sys.stderr
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)  # type: ignore[arg-type]
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        pass


def main(argv: list[str] | None = None) -> int:
    # Ray folds look-alike log lines from different processes into "[repeated Nx]": that
    # would hide epochs of concurrent trials. Read by Ray when it starts, so set it first.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    args = build_parser().parse_args(argv)
    install_stack_dumps()
    try:
        return {"train": cmd_train, "tune": cmd_tune, "best": cmd_best, "card": cmd_card,
                "export": cmd_export, "predict": cmd_predict}[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except TrainingError as exc:
        prefix = "error: " if exc.exit_code == 1 else ""
        print(f"{prefix}{str(exc).splitlines()[0]}; continue with: {resume_command(args)}",
              file=sys.stderr)
        return exc.exit_code
