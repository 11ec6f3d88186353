"""stepbench reports: MLflow -> one tidy pandas frame -> leaderboards, step curves, image grids -> HTML + PDF.

``python -m reports --out DIR`` (see reports.__main__). Library use::

    from reports import load, write_report
    results = load("sqlite:///mlflow.db", ["toy"])      # reports.frame.Results; results.scores is the tidy frame
    write_report(results, "report/")                    # report/index.html, report/report.pdf

Reads MLflow only through bench.tracking.
"""

from reports.frame import ReportInputError, Results, load
from reports.render import build_context, write_report

__all__ = ["ReportInputError", "Results", "build_context", "load", "write_report"]
