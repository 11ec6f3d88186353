"""reports.summary: the README's generated results section and the replicate check, on small synthetic MLflow stores
written through bench.tracking (tests/test_reports.py's writer)."""

from __future__ import annotations

import re

import pytest
from test_reports import CELLS, STEPS, empty_store, write_store

from reports import stats
from reports.__main__ import main as reports_main
from reports.frame import load
from reports.render import build_context
from reports.summary import RESULTS_BEGIN, RESULTS_END, compare, verdict_rows

PROVENANCE = {"provenance.cpu_model": "Test CPU 9000", "provenance.torch_version": "2.13.0+cpu",
              "provenance.float32_matmul_precision": "highest"}


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("template")
    empty_store(root)
    return root / "mlflow.db"


def test_readme_section_is_rewritten_between_the_markers_from_the_report_numbers(template, tmp_path, capsys):
    uri, _ = write_store(tmp_path / "store", template=template, failed=False, tags=PROVENANCE)
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nintro\n\n{RESULTS_BEGIN}\nnot yet generated\n{RESULTS_END}\n\n## after\n")
    assert reports_main(["readme", "--tracking-uri", uri, "--experiment", "toy", "--readme", str(readme),
                         "--n-boot", "200"]) == 0
    assert "results section rewritten" in capsys.readouterr().out
    text = readme.read_text()
    assert text.startswith("# title\n\nintro\n\n") and text.endswith(f"{RESULTS_END}\n\n## after\n")
    assert "not yet generated" not in text
    section = text[text.index(RESULTS_BEGIN):text.index(RESULTS_END)]
    context = build_context(load(uri, ["toy"]), n_boot=200, seed=0, figures=False)
    main = context["groups"][0]["main"]
    pso = main.gain_estimates[("pso", 2)]
    line = next(row for row in section.splitlines() if row.startswith("| PSO (K=2) |"))
    for s in STEPS:  # every gain over base, with its interval and verdict, as the report has it
        e = pso["S"][s]
        assert f"{e.value:+.3f} [{e.lo:+.3f}, {e.hi:+.3f}]" in line
    assert line.count("better**") == sum(pso["verdict"][c][0] == "better" for c in (*STEPS, "mean")) > 0
    assert "Test CPU 9000" in section and "torch 2.13.0+cpu" in section and "float32 matmul highest" in section
    assert "test split only" in section and "5." not in line  # the validation split (scores + 5) never shows
    # idempotent: a second run from the same store changes nothing but the date
    assert reports_main(["readme", "--tracking-uri", uri, "--readme", str(readme), "--n-boot", "200"]) == 0
    assert "unchanged" in capsys.readouterr().out

    bare = tmp_path / "BARE.md"
    bare.write_text("# no markers\n")
    assert reports_main(["readme", "--tracking-uri", uri, "--readme", str(bare)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "has no generated-results section" in err and err.count("\n") == 1


def _row(verdict, kind="beats base", row="DDPO (K=2)", what="S=1", seeded=True, value=None):
    value = value if value is not None else {"better": 0.1, "worse": -0.1}.get(verdict, 0.0)
    return dict(kind=kind, where="toy-turbo · toy-all", row=row, what=what, seeded=seeded, verdict=verdict,
                estimate=stats.Estimate(value, value - 0.05, value + 0.05, 3, "x"), p_holm=0.01)


def test_compare_counts_holds_flips_and_what_either_run_calls():
    original = [_row("better", what="S=1"), _row("better", what="S=2"), _row("worse", what="S=4"),
                _row("inconclusive", what="S=8"), _row("inconclusive", what="mean over S"),
                _row("better", row="Inference scaling", seeded=False),  # seed-independent: not compared
                _row("worse", kind="claim", row="A − B", what="A beats B")]
    replicate = [_row("better", what="S=1"), _row("inconclusive", what="S=2"), _row("better", what="S=4"),
                 _row("inconclusive", what="S=8"), _row("worse", what="mean over S"),
                 _row("worse", row="Inference scaling", seeded=False)]
    lines, holds, compared, flipped = compare(original, replicate)
    assert (holds, compared, flipped) == (1, 4, 1)
    assert lines[-1] == "replicate: 1 of 4 verdicts hold, 1 flipped"
    status = {line.split(" · ")[-1].split(":")[0]: line.split()[0] for line in lines[:-1]}
    assert status == {"S=1": "holds", "S=2": "not", "S=4": "FLIPPED", "mean over S": "new", "A beats B": "not"}
    assert any(line.startswith("not rerun ") and "A beats B" in line for line in lines)


def test_replicate_command_compares_two_experiments_of_a_store(template, tmp_path, capsys):
    """The original grid and a rerun with disjoint seeds in which DDPO's gain at S=2 turned into a loss: the CLI
    prints one line per verdict either calls significant and the summary line, and the flip is among them."""
    uri, _ = write_store(tmp_path / "store", template=template, failed=False)
    flipped = dict(CELLS)
    k, _, gain = CELLS["ddpo"]
    flipped["ddpo"] = (k, [3, 4], [gain[0], -gain[1], gain[2], gain[3]])
    flipped["sdpo"] = (k, [3, 4, 5], CELLS["sdpo"][2])
    flipped = {m: (kk, [s + 3 for s in seeds] if m not in ("ddpo", "sdpo") else seeds, g)
               for m, (kk, seeds, g) in flipped.items()}
    write_store(tmp_path / "store", failed=False, grid="toy-replicate", cells=flipped)
    assert reports_main(["replicate", "--tracking-uri", uri, "--experiment", "toy", "--replicate", "toy-replicate",
                         "--n-boot", "200"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    match = re.fullmatch(r"replicate: (\d+) of (\d+) verdicts hold, (\d+) flipped", out[-1])
    assert match, out[-1]
    holds, compared, n_flipped = map(int, match.groups())
    assert [line.split()[0] for line in out[:-1]].count("holds") == holds
    assert [line.split()[0] for line in out[:-1]].count("FLIPPED") == n_flipped >= 1
    assert len([line for line in out[:-1] if not line.startswith("not rerun")]) == compared
    assert any(line.startswith("FLIPPED") and "DDPO (K=2) · S=2: better" in line and "-> worse" in line
               for line in out)
    assert not any("Inference scaling · " in line and line.startswith("holds") for line in out)  # not seeded
    # the same numbers as verdict_rows of each experiment's own report context
    rows = [verdict_rows(build_context(load(uri, [e]), n_boot=200, seed=0, figures=False))
            for e in ("toy", "toy-replicate")]
    assert compare(*rows)[0][-1] == out[-1]


def test_the_repository_readme_has_one_generated_results_section():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert text.count(RESULTS_BEGIN) == 1 and text.count(RESULTS_END) == 1
    assert text.index(RESULTS_BEGIN) < text.index(RESULTS_END)
