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
