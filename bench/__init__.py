"""The stepbench harness: Hydra app and configs, grid expansion and resume, the cell runner, evaluation, tracking.

Entry points: ``python -m bench.run`` (one cell or, with ``-m grid=<name>``, a named grid) and
``python -m bench.tracking`` (MLflow UI and run listings).
"""

__version__ = "0.1.0"
