"""normlab compare: the verdicts of suite and run folders side by side, claim by claim and finding
by finding; --check fails when a verdict does not hold.

The folders are made by hand (a real config, every job marked finished, a summary with the
verdicts the test chose), so each agreement class is reached on purpose; one real run checks
that a folder normlab run wrote is read as it is."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from normlab.cli import main
from normlab.lab.compare import agreement, compare_folders, comparison_md
from normlab.lab.config import apply_overrides, config_to_dict
from normlab.lab.experiments.base import Summary
from normlab.lab.experiments.registry import get_experiment
from normlab.lab.trainer import plan_jobs
from normlab.lab.verdicts import Finding


def _finding(claim: str, verdict: str, text: str = "1.0x [0.9, 1.1]", label: str = "") -> Finding:
    return Finding(claim, f"statistic of {claim}", 1.0, 0.9, 1.1, 3, verdict, "expected", verdict == "supported",
                   f"reason for {verdict}", text=text, label=label)


def _finished_run(folder: Path, experiment: str, findings: list[Finding], overrides: dict | None = None) -> Path:
    """A run folder as normlab run leaves it, with ``findings`` as its verdicts."""
    config = apply_overrides(get_experiment(experiment).quick_config(), overrides or {})
    (folder / "jobs").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config_to_dict(config)))
    for job in plan_jobs(config, folder):
        (folder / "jobs" / f"{job.key}.jsonl").write_text("")
    summary = Summary(experiment, "claim", "supported", "expected", True, "headline", [], [], findings=findings)
    (folder / "summary.json").write_text(json.dumps(summary.to_dict()))
    return folder


def _suite(folder: Path, runs: dict[str, list[Finding]], overrides: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "suite.json").write_text(json.dumps({"experiments": sorted(runs), "quick": True,
                                                   "overrides": overrides or {}}))
    for name, findings in runs.items():
        _finished_run(folder / name, name, findings, overrides)
    return folder


def test_agreement_classes():
    assert agreement(["supported", "supported", "supported"]) == "same"
    assert agreement(["inconclusive", "inconclusive"]) == "same"
    assert agreement(["supported", "inconclusive"]) == "differs"
    assert agreement(["mixed", "not supported"]) == "differs"
    assert agreement(["supported", "not supported"]) == "contradicts"
    assert agreement(["supported", None, "not supported"]) == "contradicts"
    assert agreement(["supported", None]) == "not compared"


@pytest.fixture
def two_suites(tmp_path):
    a = _suite(tmp_path / "a", {
        "init-scale": [_finding("C4", "supported", "2.3 decades [2.3, 2.3]")],
        "lr-sensitivity": [_finding("C5", "supported", label="range"), _finding("C5", "supported", label="bjorck")],
        "placement": [_finding("C13", "not supported", label="sigmoid"), _finding("C13", "inconclusive", label="relu")],
    })
    b = _suite(tmp_path / "b", {
        "init-scale": [_finding("C4", "supported", "1.9 decades [1.5, 2.3]")],
        "lr-sensitivity": [_finding("C5", "supported", label="range"), _finding("C5", "inconclusive", label="bjorck")],
        "placement": [_finding("C13", "supported", label="sigmoid"), _finding("C13", "inconclusive", label="relu")],
    }, overrides={"train.first_seed": 100})
    return a, b


def test_claims_and_findings_side_by_side(two_suites):
    a, b = two_suites
    comparison = compare_folders([a, b])
    by_claim = {row.claim: row for row in comparison.claims}
    assert list(by_claim) == ["C4", "C5", "C13"]  # measured claims only, in claim order
    assert by_claim["C4"].agreement == "same"
    # C5 combined: supported + supported vs supported + inconclusive -> supported vs inconclusive
    assert [f.verdict for f in by_claim["C5"].findings] == ["supported", "inconclusive"]
    assert by_claim["C5"].agreement == "differs"
    # C13 combined: not supported + inconclusive -> inconclusive in A; supported + inconclusive ->
    # inconclusive in B: the claims agree, while the sigmoid finding contradicts itself
    assert by_claim["C13"].agreement == "same"
    parts = {(row.claim, row.part): row.agreement for row in comparison.parts}
    assert parts == {("C4", "statistic of C4"): "same", ("C5", "range"): "same", ("C5", "bjorck"): "differs",
                     ("C13", "sigmoid"): "contradicts", ("C13", "relu"): "same"}
    assert not comparison.robust
    # the suites' own settings (seeds, data...) beside what they were given: the seeds differ
    assert comparison.labels == [f"{a} (train.first_seed=0)", f"{b} (train.first_seed=100)"]


def test_the_markdown_names_the_folders_and_every_verdict(two_suites):
    a, b = two_suites
    text = comparison_md(compare_folders([a, b]))
    assert f"- **A**: suite {a} (train.first_seed=0)\n- **B**: suite {b} (train.first_seed=100)" in text
    assert "2 of 3 claims compared have the same verdict in every folder; differs: C5." in text
    assert ("| C4 | batch norm lowers sensitivity to the initial weights | **supported** | **supported** | same |"
            in text)
    assert ("| C4 | init-scale | statistic of C4 | 2.3 decades [2.3, 2.3] (**supported**) | "
            "1.9 decades [1.5, 2.3] (**supported**) | same |") in text
    assert "| C13 | placement | sigmoid | 1.0x [0.9, 1.1] (**not supported**) | 1.0x [0.9, 1.1] (**supported**) | " \
           "contradicts |" in text


def test_check_exit_code_and_files(two_suites, tmp_path, capsys):
    a, b = two_suites
    out, js = tmp_path / "out" / "compare.md", tmp_path / "compare.json"
    assert main(["compare", str(a), str(b), "--check", "--out", str(out), "--json", str(js)]) == 1
    printed = capsys.readouterr().out
    assert out.read_text() == printed
    data = json.loads(js.read_text())
    assert data["robust"] is False and [s["label"] for s in data["sources"]] == [f"{a} (train.first_seed=0)",
                                                                          f"{b} (train.first_seed=100)"]
    assert {r["claim"]: r["agreement"] for r in data["claims"]} == {"C4": "same", "C5": "differs", "C13": "same"}
    assert main(["compare", str(a), str(b)]) == 0  # without --check the comparison is only reported


def test_check_passes_when_every_verdict_holds(tmp_path, capsys):
    a = _suite(tmp_path / "a", {"init-scale": [_finding("C4", "supported")]})
    b = _suite(tmp_path / "b", {"init-scale": [_finding("C4", "supported")]}, overrides={"data.name": "digits"})
    c = _finished_run(tmp_path / "c", "init-scale", [_finding("C4", "supported")], {"train.first_seed": 7})
    assert main(["compare", str(a), str(b), str(c), "--check"]) == 0
    text = capsys.readouterr().out
    assert "1 of 1 claims compared have the same verdict in every folder." in text
    assert f'- **A**: suite {a} (data.name="mnist-5k", train.first_seed=0)' in text
    assert f'- **B**: suite {b} (data.name="digits", train.first_seed=0)' in text
    assert f'- **C**: run {c} (data.name="mnist-5k", train.first_seed=7)' in text


def test_the_labels_name_only_what_sets_the_folders_apart(tmp_path):
    """A suite records the config its experiments share; a key one suite shares and the other does
    not (other experiments) is no difference, a key given to one suite is."""
    a = _suite(tmp_path / "a", {"init-scale": [_finding("C4", "supported")],
                                "placement": [_finding("C13", "inconclusive")]})
    b = _suite(tmp_path / "b", {"init-scale": [_finding("C4", "supported")]})
    c = _suite(tmp_path / "c", {"init-scale": [_finding("C4", "supported")],
                                "placement": [_finding("C13", "inconclusive")]}, overrides={"model.widths": [16]})
    assert compare_folders([a, b]).labels == [str(a), str(b)]
    assert compare_folders([a, c]).labels == [str(a), f"{c} (model.widths=[16])"]


def test_a_claim_measured_in_one_folder_is_not_compared(tmp_path, capsys):
    a = _suite(tmp_path / "a", {"init-scale": [_finding("C4", "supported")],
                                "lr-sensitivity": [_finding("C5", "not supported")]})
    b = _suite(tmp_path / "b", {"init-scale": [_finding("C4", "supported")]})
    comparison = compare_folders([a, b])
    assert [(r.claim, r.agreement) for r in comparison.claims] == [("C4", "same"), ("C5", "not compared")]
    assert comparison.robust
    assert "measured in only one folder: C5" in comparison_md(comparison)


def test_an_unfinished_experiment_is_named(tmp_path):
    a = _suite(tmp_path / "a", {"init-scale": [_finding("C4", "supported")]})
    b = _suite(tmp_path / "b", {"init-scale": [_finding("C4", "supported")],
                                "lr-sensitivity": [_finding("C5", "supported")]})
    next((b / "lr-sensitivity" / "jobs").iterdir()).unlink()
    text = comparison_md(compare_folders([a, b]))
    assert f"- **B**: suite {b}; not finished: lr-sensitivity" in text


@pytest.mark.parametrize("args, message", [
    (["ONE"], r"compare needs at least two folders, got 1"),
    (["ONE", "ONE"], r"compare got the same folder twice"),
    (["ONE", "NOWHERE"], r"'.*/x' is neither a suite folder \(no suite.json\) nor a run folder"),
    (["ONE", "OTHER"], r"the folders share no measured claim \(.*a measures C4; .*b measures C5\): nothing to compare"),
    (["ONE", "ONE2", "--out", "TMP"], r"--out '.*' is a folder; give a file name"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, args, message):
    _suite(tmp_path / "a", {"init-scale": [_finding("C4", "supported")]})
    _suite(tmp_path / "a2", {"init-scale": [_finding("C4", "supported")]})
    _suite(tmp_path / "b", {"lr-sensitivity": [_finding("C5", "supported")]})
    names = {"ONE": tmp_path / "a", "ONE2": tmp_path / "a2", "OTHER": tmp_path / "b", "NOWHERE": tmp_path / "x",
             "TMP": tmp_path}
    assert main(["compare", *[str(names.get(a, a)) for a in args]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err), err


def test_real_runs_are_compared_as_normlab_run_wrote_them(tmp_path, capsys):
    """Two tiny real runs of one experiment on different seeds: read from their metrics (no summary
    yet: it is built), labelled by the seed that set them apart."""
    tiny = ["--set", "train.steps=20", "--set", "train.eval_every=10", "--set", "model.widths=[16]", "--seeds", "2",
            "--data", "synthetic", "--jobs", "1", "--no-progress"]
    for name, first in (("r0", "0"), ("r5", "5")):
        assert main(["run", "ioffe2015-mnist", "--quick", *tiny, "--first-seed", first, "--out",
                     str(tmp_path / name)]) == 0
        (tmp_path / name / "summary.json").unlink()
    capsys.readouterr()
    comparison = compare_folders([tmp_path / "r0", tmp_path / "r5"])
    assert comparison.labels == [f"{tmp_path / 'r0'} (train.first_seed=0)", f"{tmp_path / 'r5'} (train.first_seed=5)"]
    c1 = next(row for row in comparison.claims if row.claim == "C1")
    assert [f.verdict for f in c1.findings] == ["inconclusive", "inconclusive"]  # two seeds: no verdict
    assert c1.agreement == "same" and (tmp_path / "r0" / "summary.json").is_file()
