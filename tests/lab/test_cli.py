"""The normlab command: list, --version, --help, argument errors, and a --quick run end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import normlab
from normlab.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "normlab", *args], capture_output=True, text=True, timeout=600)


def test_list_names_every_experiment(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("ioffe2015-mnist"))
    assert "C1,C3" in line and "sigmoid MLP" in line
    from normlab.lab.claims import CLAIMS
    from normlab.lab.experiments import all_experiments

    tested = {c for e in all_experiments().values() for c in e.claims}
    assert f"{len(tested)} of {len(CLAIMS)} claims have an experiment" in out  # C1-C16 and extensions (X1, ...)


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"normlab {normlab.__version__}"


def test_help_has_examples_and_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "normlab run ioffe2015-mnist --quick" in out and "exit codes" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["run"], "the following arguments are required: experiment"),
        (["run", "nope"], "unknown experiment 'nope'; valid experiments are ["),
        (["run", "ioffe2015-mnist", "--set", "train.lrr=1"], "unknown config key 'train.lrr'"),
        (["run", "ioffe2015-mnist", "--set", "train.steps=fast"], "train.steps must be int"),
        (["run", "ioffe2015-mnist", "--steps", "x"], "argument --steps: invalid int value: 'x'"),
        (["run", "ioffe2015-mnist", "--data", "mnist"], "pass data_dir (--data-dir)"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["report", "/nonexistent/run"], "does not exist"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("normlab: error: ") and message in err, err
    assert "\n" not in err and "Traceback" not in err


def test_quick_run_end_to_end(tmp_path):
    out = tmp_path / "run"
    done = run_cli("run", "ioffe2015-mnist", "--quick", "--check", "--no-progress", "--out", str(out))
    assert done.returncode == 0, done.stderr
    for name in ("config.json", "metrics.jsonl", "report.html", "report.md", "summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["met"] and summary["verdict"] == "supported"
    assert "fewer steps than no norm" in done.stdout and f"report: {out / 'report.html'}" in done.stdout
    # the report is rebuilt from the run folder alone, identically
    before = (out / "report.md").read_text()
    again = run_cli("report", str(out))
    assert again.returncode == 0 and (out / "report.md").read_text() == before


def test_check_exits_1_when_the_outcome_is_missed(tmp_path):
    # 20 steps are far too few for either arm to reach 85%: the expected outcome is missed.
    done = run_cli("run", "ioffe2015-mnist", "--quick", "--check", "--no-progress", "--steps", "20",
                   "--seeds", "1", "--set", "train.eval_every=10", "--out", str(tmp_path / "run"))
    assert done.returncode == 1 and "expected outcome missed" in done.stderr


def test_a_toml_grid_table_sets_the_grid(tmp_path, capsys):
    toml = tmp_path / "grid.toml"
    toml.write_text('[grid]\n"train.lr" = [0.1, 1.0]\n\n[train]\neval_every = 5\n')
    out = tmp_path / "run"
    code = main(["run", "ioffe2015-mnist", "--quick", "--no-progress", "--config", str(toml), "--steps", "5",
                 "--seeds", "1", "--data", "synthetic", "--jobs", "1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["grid"] == {"train.lr": [0.1, 1.0]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {(r["arm"], r["point"]["train.lr"]) for r in rows} == {(a, lr) for a in ("none", "batch") for lr in (0.1, 1.0)}
    assert "2 arms x 2 grid points x 1 seeds" in capsys.readouterr().err


def test_set_key_that_every_arm_overrides_is_rejected_by_the_command(capsys, tmp_path):
    """Issue 11 item 8: `--set model.norm=...` was saved in config.json and ignored."""
    assert main(["run", "ioffe2015-mnist", "--quick", "--no-progress", "--out", str(tmp_path / "run"),
                 "--set", "model.norm=group"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("normlab: error: --set model.norm=group would be ignored: every arm") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
