"""normlab reproduce: experiments chosen by claim, one suite folder, an index rebuilt from the
metrics alone, --check naming the misses, --resume."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from normlab.cli import main
from normlab.lab.claims import CLAIMS
from normlab.lab.config import ConfigError
from normlab.lab.experiments import all_experiments
from normlab.lab.suite import SuiteOptions, run_suite, select_experiments, write_index

TINY = {"data.name": "synthetic", "train.steps": 20, "train.eval_every": 10, "train.seeds": 2, "model.widths": [16]}


def test_select_by_claim_or_name():
    experiments = all_experiments()
    assert [e.name for e in select_experiments(claims=["C1"])] == ["ioffe2015-mnist"]
    assert [e.name for e in select_experiments()] == sorted(experiments)
    for claim in {c for e in experiments.values() for c in e.claims}:
        assert all(claim in e.claims for e in select_experiments(claims=[claim]))
    with pytest.raises(ValueError, match=r"unknown claim\(s\) C99; the claims are C1, C2"):
        select_experiments(claims=["C99"])
    with pytest.raises(ValueError, match=r"unknown experiment\(s\) nope; valid experiments are \["):
        select_experiments(names=["nope"])
    untested = [c for c in CLAIMS if not any(c in e.claims for e in experiments.values())]
    if untested:
        with pytest.raises(ValueError, match=f"no experiment tests {untested[0]} yet; claims with an experiment: C1"):
            select_experiments(claims=[untested[0]])


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "suite"
    options = SuiteOptions(["ioffe2015-mnist"], quick=True, overrides=dict(TINY))
    summaries = run_suite(out, options, jobs=2, progress=False)
    return out, summaries


def test_the_suite_folder_and_its_index(suite):
    out, summaries = suite
    assert json.loads((out / "suite.json").read_text())["experiments"] == ["ioffe2015-mnist"]
    for name in ("config.json", "metrics.jsonl", "report.html", "summary.json"):
        assert (out / "ioffe2015-mnist" / name).is_file()
    index = (out / "index.md").read_text()
    claim_rows = [line for line in index.splitlines() if line.startswith(("| C", "| X"))]  # claims, extensions
    assert [row.split(" | ")[0][2:] for row in claim_rows] == list(CLAIMS)  # one row per claim, in order
    c1 = claim_rows[0]
    finding = next(f for f in summaries[0].findings if f.claim == "C1")
    assert f"| {finding.text} | **{finding.verdict}** |" in c1 and "[ioffe2015-mnist](ioffe2015-mnist/report.md)" in c1
    # Two seeds: every verdict is inconclusive, and the index says why.
    assert {f.verdict for f in summaries[0].findings} == {"inconclusive"}
    assert "only 2 seeds: a verdict needs at least 3" in index
    assert "C2 | batch norm makes training more stable |" in index
    html = (out / "index.html").read_text()
    assert html.count("<tr") == len(CLAIMS) + 1 and 'href="ioffe2015-mnist/report.html"' in html
    assert "data:image/png;base64," in html  # the experiment's first figure, inlined


def test_the_index_is_rebuilt_from_the_metrics_alone(suite):
    out, _ = suite
    before = {name: (out / name).read_text() for name in ("index.md", "index.html", "ioffe2015-mnist/report.md")}
    for name in ("index.md", "index.html", "ioffe2015-mnist/report.md", "ioffe2015-mnist/report.html",
                 "ioffe2015-mnist/summary.json"):
        (out / name).unlink()
    assert main(["report", str(out)]) == 0
    assert {name: (out / name).read_text() for name in before} == before


def test_resume_needs_the_same_options_and_redoes_nothing(suite, tmp_path):
    out, _ = suite
    with pytest.raises(ConfigError, match="already holds a suite; continue it with --resume"):
        run_suite(out, SuiteOptions(["ioffe2015-mnist"], quick=True, overrides=dict(TINY)), jobs=1, progress=False)
    with pytest.raises(ConfigError, match="--resume: the suite in .* ran with other options"):
        run_suite(out, SuiteOptions(["ioffe2015-mnist"], quick=False, overrides=dict(TINY)), jobs=1, resume=True,
                  progress=False)
    metrics = (out / "ioffe2015-mnist" / "metrics.jsonl").read_text()
    run_suite(out, SuiteOptions(["ioffe2015-mnist"], quick=True, overrides=dict(TINY)), jobs=1, resume=True,
              progress=False)
    assert (out / "ioffe2015-mnist" / "metrics.jsonl").read_text() == metrics  # wall times too: nothing redone


def test_an_unfinished_experiment_is_listed_as_such(tmp_path):
    out = tmp_path / "suite"
    out.mkdir()
    (out / "suite.json").write_text(json.dumps({"experiments": ["ioffe2015-mnist"], "quick": True, "overrides": TINY}))
    write_index(out)
    index = (out / "index.md").read_text()
    assert "not started (continue with normlab reproduce --resume)" in index
    assert "| C1 | batch norm makes training faster | ioffe2015-mnist | unfinished | **-** |" in index


def test_reproduce_check_names_the_experiments_that_missed(tmp_path, capsys):
    # Two seeds cannot give a verdict (inconclusive), so the expected outcome is missed.
    code = main(["reproduce", "--quick", "--claims", "C1", "--check", "--no-progress", "--jobs", "2",
                 "--out", str(tmp_path / "s"), "--seeds", "2", "--data", "synthetic"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "normlab: --check: expected outcome missed by ioffe2015-mnist" in err
    assert f"index: {tmp_path / 's' / 'index.html'}" in out


def test_reproduce_arguments_are_checked(capsys):
    assert main(["reproduce", "--claims", "C99"]) == 2
    assert "unknown claim(s) C99" in capsys.readouterr().err
    assert main(["reproduce", "--jobs", "0", "--experiments", "ioffe2015-mnist"]) == 2
    assert "--jobs must be at least 1, got 0" in capsys.readouterr().err
