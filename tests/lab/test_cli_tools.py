"""normlab inspect / fold on a lab checkpoint, and their errors."""

from __future__ import annotations

import torch

from normlab.cli import main

from .small import EXPERIMENT, small_config
from normlab.lab.trainer import Trainer


def test_inspect_and_fold_a_lab_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(EXPERIMENT, small_config(**{"train.steps": 10, "train.seeds": 1}), run, progress=False).run()
    checkpoint = run / "checkpoints" / "batch-seed0.pt"
    assert main(["inspect", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "arm 'batch'" in out and "BatchNorm1d" in out and "0 with problems" in out
    assert main(["fold", str(checkpoint), str(tmp_path / "folded.pt")]) == 0
    out = capsys.readouterr().out
    assert "folded 2 batch norm(s), skipped 0" in out
    folded = torch.load(tmp_path / "folded.pt", weights_only=True)
    assert not any("running_mean" in key for key in folded["model"])


def test_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    bogus = tmp_path / "notes.txt"
    bogus.write_text("hello")
    assert main(["inspect", str(bogus)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("normlab: error: ") and "notes.txt" in err and "state dict" in err


def test_item_10_inspect_and_fold_take_a_run_folder(tmp_path, capsys):
    """Issue 15 item 10: the README's globs broke once two runs existed; a run folder serves instead."""
    run = tmp_path / "run"
    Trainer(EXPERIMENT, small_config(**{"train.steps": 10, "train.seeds": 2}), run, progress=False).run()
    assert main(["inspect", str(run)]) == 0
    out = capsys.readouterr().out
    for key in ("none-seed0", "none-seed1", "batch-seed0", "batch-seed1"):
        assert f"checkpoints/{key}.pt: lab checkpoint" in out, key
    assert main(["inspect", str(run), "--arm", "batch", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "batch-seed1.pt" in out and "seed0" not in out and "none-seed" not in out
    # fold: the folder, the arm, and by default the first seed; the same file as folding it by name
    assert main(["fold", str(run), str(tmp_path / "a.pt"), "--arm", "batch"]) == 0
    assert main(["fold", str(run / "checkpoints" / "batch-seed0.pt"), str(tmp_path / "b.pt")]) == 0
    a, b = (torch.load(tmp_path / name, weights_only=True)["model"] for name in ("a.pt", "b.pt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main(["fold", str(run), str(tmp_path / "c.pt")]) == 2  # two arms fit: which one?
    assert "holds 2 checkpoints that fit: batch-seed0.pt, none-seed0.pt; choose one with --arm" in capsys.readouterr().err
    assert main(["inspect", str(run), "--arm", "group"]) == 2
    assert "holds no checkpoint of arm 'group' (it has: batch-seed0.pt" in capsys.readouterr().err
