"""``python -m reports [--tracking-uri URI] [--experiment NAME ...] --out DIR``: render DIR/index.html + DIR/report.pdf.

Subcommands (reports.summary), from the same numbers as the report:
    python -m reports readme [--experiment stepbench/toy] [--readme README.md]   README's generated results section
    python -m reports replicate --experiment stepbench/toy --replicate stepbench/toy-replicate
                                                          which verdicts hold under disjoint training seeds

Exit codes: 0 written; 2 bad input (no store, no stepbench experiment, unknown experiment, no runs, a README without
the markers), with a one-line message on stderr instead of a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench.tracking import DEFAULT_URI
from reports.frame import ReportInputError, load
from reports.stats import N_BOOT


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", default=DEFAULT_URI, help=f"MLflow tracking URI (default {DEFAULT_URI})")
    parser.add_argument("--n-boot", type=int, default=N_BOOT, help=f"bootstrap resamples (default {N_BOOT})")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")


def report(argv: list[str]) -> int:
    from reports.render import write_report

    parser = argparse.ArgumentParser(prog="python -m reports", description=__doc__.split("\n")[0].strip("`"))
    _common(parser)
    parser.add_argument("--experiment", action="append", metavar="NAME",
                        help="grid name ('toy') or experiment ('stepbench/toy'); repeatable; "
                             "default: every stepbench/* experiment but the sweeps'")
    parser.add_argument("--sweeps", action="store_true",
                        help="also report sweep experiments (stepbench/sweep/*, their best trials); default: left out")
    parser.add_argument("--latest", action="store_true",
                        help="of the selected experiments, report only the one with the most recent run")
    parser.add_argument("--out", required=True, help="output directory (index.html, report.pdf)")
    parser.add_argument("--no-pdf", action="store_true", help="write only index.html")
    parser.add_argument("--grid-samples", type=int, default=3, help="samples shown in each image grid")
    args = parser.parse_args(argv)
    tic = time.perf_counter()
    results = load(args.tracking_uri, args.experiment, latest=args.latest, sweeps=args.sweeps)
    paths = write_report(results, args.out, pdf=not args.no_pdf, n_boot=args.n_boot, seed=args.seed,
                         grid_samples=args.grid_samples)
    print(f"{len(results.runs)} runs, {len(results.scores)} image scores from {', '.join(results.experiments)} "
          f"-> {', '.join(str(p) for p in paths.values())} ({time.perf_counter() - tic:.1f} s)")
    return 0


def readme(argv: list[str]) -> int:
    from reports.summary import readme_section, summary_context, write_readme

    parser = argparse.ArgumentParser(prog="python -m reports readme",
                                     description="rewrite README.md's generated results section from the report")
    _common(parser)
    parser.add_argument("--experiment", action="append", metavar="NAME", default=None,
                        help="grid or experiment (default stepbench/toy); repeatable")
    parser.add_argument("--readme", default="README.md", help="the file to rewrite (default README.md)")
    parser.add_argument("--print", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args(argv)
    results = load(args.tracking_uri, args.experiment or ["stepbench/toy"])
    section = readme_section(results, summary_context(results, n_boot=args.n_boot, seed=args.seed))
    if args.print:
        print(section)
        return 0
    changed = write_readme(args.readme, section)
    print(f"{args.readme}: results section {'rewritten' if changed else 'unchanged'} from "
          f"{', '.join(results.experiments)} ({len(results.runs)} runs)")
    return 0


def replicate(argv: list[str]) -> int:
    from reports.summary import compare, summary_context, verdict_rows

    parser = argparse.ArgumentParser(prog="python -m reports replicate",
                                     description="which verdicts of one experiment hold in a rerun with other seeds")
    _common(parser)
    parser.add_argument("--experiment", default="stepbench/toy", help="the original (default stepbench/toy)")
    parser.add_argument("--replicate", default="stepbench/toy-replicate",
                        help="the rerun with disjoint seeds (default stepbench/toy-replicate)")
    args = parser.parse_args(argv)
    rows = []
    for name in (args.experiment, args.replicate):
        results = load(args.tracking_uri, [name])
        rows.append(verdict_rows(summary_context(results, n_boot=args.n_boot, seed=args.seed)))
    lines, *_ = compare(*rows)
    print("\n".join(lines))
    return 0


COMMANDS = {"readme": readme, "replicate": replicate}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per artifact otherwise
    command = COMMANDS.get(argv[0], report) if argv else report
    try:
        return command(argv[1:] if argv and argv[0] in COMMANDS else argv)
    except ReportInputError as err:  # includes reports.summary.ReadmeError
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
