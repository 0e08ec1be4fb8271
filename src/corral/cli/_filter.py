"""`corral filter`: trajectory files filtered by their episodes' verdicts in the audit store
(`corral.rl.filter_trajectories` does the work; this is its command line).

Exit status: 0 when done; 1 when an input line is bad (the file and line are named, nothing is
written) or the store can't be read; 2 for a wrong option (argparse)."""

from __future__ import annotations

import argparse
import json
import sys

from corral._errors import CorralError


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    f = sub.add_parser(
        "filter",
        help="keep the trajectories of clean episodes; drop or flag violated ones, set infra errors aside",
        description="Read trajectory files (JSON lines), look each line's episode up in the audit store "
        "and write the lines of clean episodes to OUTPUT; violated episodes' lines are dropped (or "
        "flagged with their verdict), infra_error ones go to the aside file with theirs. Prints a "
        "summary by category (--json: as JSON); a progress bar on stderr when it is a terminal.",
    )
    f.add_argument("files", nargs="+", metavar="TRAJ.jsonl")
    f.add_argument(
        "--field",
        required=True,
        metavar="KEY[.KEY...]",
        help="where each line names its episode, e.g. meta.episode",
    )
    f.add_argument(
        "--label-key",
        default="episode",
        metavar="K",
        help="the sandbox label the field's value is (default: episode)",
    )
    f.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="K=V",
        help="a label every episode of the run carries, e.g. --label run=r42 (repeat)",
    )
    f.add_argument("--output", "-o", required=True, metavar="FILE", help="the kept lines")
    f.add_argument("--aside", metavar="FILE", help="infra_error lines (default: OUTPUT with .aside)")
    f.add_argument("--dropped", metavar="FILE", help="write dropped lines here (default: nowhere)")
    f.add_argument(
        "--mode",
        choices=["drop", "flag"],
        default="drop",
        help="drop violated episodes' lines, or keep them with the verdict in --flag-field",
    )
    f.add_argument("--flag-field", default="corral", metavar="KEY", help="default: corral")
    f.add_argument(
        "--store", metavar="PATH|URL", help="SQLite file or postgresql:// URL (default: the host's)"
    )
    f.add_argument("--json", action="store_true", help="print the summary as JSON")
    bar = f.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None)
    bar.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> int:
    from corral.cli._record import labels_arg
    from corral.rl import filter_trajectories

    try:
        summary = filter_trajectories(
            args.files,
            store=args.store,
            field=args.field,
            output=args.output,
            aside=args.aside,
            dropped=args.dropped,
            label_key=args.label_key,
            labels=labels_arg(args.label),
            mode=args.mode,
            flag_field=args.flag_field,
            progress=args.progress,
        )
    except ValueError as e:  # a wrong option value the parser could not catch (--field a..b)
        print(f"corral filter: {e}", file=sys.stderr)
        return 2
    except CorralError as e:  # TrajectoryError (file:line), StoreError, a --label without '='
        print(f"corral filter: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        for line in summary.text():
            print(line)
    return 0
