"""``python -m reports [--tracking-uri URI] [--experiment NAME ...] --out DIR``: render DIR/index.html + DIR/report.pdf.

Exit codes: 0 written; 2 bad input (no store, no stepbench experiment, unknown experiment, no runs), with a
one-line message on stderr instead of a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench.tracking import DEFAULT_URI
from reports.frame import ReportInputError, load
from reports.render import write_report
from reports.stats import N_BOOT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports", description=__doc__.split("\n")[0].strip("`"))
    parser.add_argument("--tracking-uri", default=DEFAULT_URI, help=f"MLflow tracking URI (default {DEFAULT_URI})")
    parser.add_argument("--experiment", action="append", metavar="NAME",
                        help="grid name ('toy') or experiment ('stepbench/toy'); repeatable; "
                             "default: every stepbench/* experiment but the sweeps'")
    parser.add_argument("--sweeps", action="store_true",
                        help="also report sweep experiments (stepbench/sweep/*, their best trials); default: left out")
    parser.add_argument("--latest", action="store_true",
                        help="of the selected experiments, report only the one with the most recent run")
    parser.add_argument("--out", required=True, help="output directory (index.html, report.pdf)")
    parser.add_argument("--no-pdf", action="store_true", help="write only index.html")
    parser.add_argument("--n-boot", type=int, default=N_BOOT, help=f"bootstrap resamples (default {N_BOOT})")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--grid-samples", type=int, default=3, help="fixed samples shown in each image grid")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per artifact otherwise
    tic = time.perf_counter()
    try:
        results = load(args.tracking_uri, args.experiment, latest=args.latest, sweeps=args.sweeps)
    except ReportInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    paths = write_report(results, args.out, pdf=not args.no_pdf, n_boot=args.n_boot, seed=args.seed,
                         grid_samples=args.grid_samples)
    print(f"{len(results.runs)} runs, {len(results.scores)} image scores from {', '.join(results.experiments)} "
          f"-> {', '.join(str(p) for p in paths.values())} ({time.perf_counter() - tic:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
