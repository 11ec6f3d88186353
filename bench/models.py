"""`python -m bench.models {list,build,measure}`: the base-model zoo from the command line.

    python -m bench.models list
    python -m bench.models build toy-turbo          # retrains toy-base and toy-turbo (seeded)
    python -m bench.models measure toy-turbo -n 1024
    python -m bench.models checksums toy-turbo      # re-record the sha256 of its weight files in measured.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TOY = ("toy-base", "toy-turbo", "toy-flow")


def _table(report: dict) -> str:
    lines = []
    for model, entry in report.items():
        lines.append(f"{model}  (n={entry['n']} fixed-seed samples, guidance {entry['guidance']}, "
                     f"{entry.get('seconds', '?')} s to build)")
        lines.append(f"  {'S':>4} " + " ".join(f"{k:>7}" for k in ("all", "mean3", "color", "shape", "count")))
        for s, row in entry["rewards"].items():
            lines.append(f"  {s:>4} " + " ".join(f"{row[k]:7.3f}" for k in ("all", "mean3", "color", "shape", "count")))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the model zoo")
    b = sub.add_parser("build", help="train the toy world's checkpoints (seeded, deterministic on CPU)")
    b.add_argument("model", help="toy-base, toy-turbo or toy-flow (the latter two also build toy-base if it is missing)")
    b.add_argument("--out", type=Path, default=None, help="weights folder (default: the package's)")
    b.add_argument("-n", type=int, default=1024, help="fixed-seed samples per step count to measure")
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--checkpoints", type=Path, default=None, help="save EMA snapshots here every 500 steps")
    m = sub.add_parser("measure", help="verifier rewards of a toy checkpoint per step count")
    m.add_argument("model")
    m.add_argument("-n", type=int, default=1024)
    m.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    c = sub.add_parser("checksums", help="record the sha256 of a toy model's weight files in its measured.json")
    c.add_argument("model")
    args = parser.parse_args(argv)

    from tasks import models

    if args.command == "list":
        for name in models.names():
            spec = models.get(name)
            print(f"{name:12s} {spec.family:5s} {spec.source:40s} steps {list(spec.step_counts)}")
        return 0
    if args.model not in TOY:
        models.get(args.model)  # unknown names raise with the valid ones
        print(f"only the toy models are built here; {args.model} loads from {models.get(args.model).source}",
              file=sys.stderr)
        return 2
    if args.command == "checksums":
        from tasks.weights import record_checksums

        for rel, digest in record_checksums(models.get(args.model).source).items():
            print(f"{digest}  {rel}")
        return 0
    import torch

    from tasks.toy import train

    torch.set_num_threads(getattr(args, "threads", 1))
    if args.command == "build":
        report = train.build(args.model, out=args.out or train.WEIGHTS, n_measure=args.n,
                             checkpoints=args.checkpoints)
    else:
        spec = models.get(args.model)
        pipe = models.load_pipeline(args.model)
        report = {args.model: {"n": args.n, "guidance": spec.guidance_scale,
                               "rewards": train.measure(pipe, args.steps, args.n, guidance=spec.guidance_scale)}}
    print(_table(report))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
