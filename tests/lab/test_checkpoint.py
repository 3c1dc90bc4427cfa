"""inspect_checkpoint / fold_checkpoint: what `normlab inspect` and `normlab fold` run."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from normlab.lab.config import ExperimentConfig, apply_overrides, arm_config, config_from_dict, config_to_dict
from normlab.lab.models import build_model
from normlab.lab.checkpoint import fold_checkpoint, inspect_checkpoint
from normlab.surgery.statefile import CheckpointError

from surgery.helpers import assert_relative_close, randomize_norms  # tests/ is on sys.path (rootdir)


def lab_config(kind: str = "mlp", placement: str = "before") -> ExperimentConfig:
    config = ExperimentConfig(experiment="demo", arms={"batch": {"model.norm": "batch"}, "group": {"model.norm": "group"}})
    return apply_overrides(config, {"model.kind": kind, "model.widths": [8, 8], "model.activation": "relu",
                                    "model.placement": placement}, parse=False)


def save_lab_checkpoint(path, kind: str = "mlp", arm: str = "batch", placement: str = "before",
                        input_shape=(1, 6, 6)) -> nn.Module:
    config = lab_config(kind, placement)
    torch.manual_seed(0)
    model = randomize_norms(build_model(arm_config(config, arm).model, input_shape, 5)).eval()
    torch.save({"model": model.state_dict(), "config": config_to_dict(config), "step": 40}, path)
    return model


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------


def test_inspect_lab_checkpoint_names_layer_classes(tmp_path):
    path = tmp_path / "batch-seed0.pt"
    save_lab_checkpoint(path)
    text = inspect_checkpoint(path)
    lines = text.splitlines()
    assert lines[0] == f"{path}: lab checkpoint of experiment 'demo', arm 'batch', step 40 (mlp, norm 'batch')"
    assert lines[1].split() == ["layer", "type", "C", "batches", "max", "|mean|", "min", "var", "max", "var", "health"]
    rows = [line.split() for line in lines[2:4]]
    assert [r[:4] for r in rows] == [["1.norm", "BatchNorm1d", "8", "10"], ["2.norm", "BatchNorm1d", "8", "10"]]
    assert [r[-1] for r in rows] == ["ok", "ok"]
    assert lines[4] == "2 normalization layer(s), 0 with problems"


def test_inspect_state_dict_reports_broken_statistics(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.BatchNorm2d(4))
    randomize_norms(model)
    with torch.no_grad():
        model[1].running_var[2] = float("nan")
    model[3] = nn.BatchNorm2d(4)  # never updated
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    text = inspect_checkpoint(path)
    assert text.startswith(f"{path}: state dict with ")
    rows = {line.split()[0]: line for line in text.splitlines()[2:5]}
    assert rows["1"].endswith("nan") and "batch/instance norm" in rows["1"]
    assert rows["2"].endswith("no running stats") and "affine only" in rows["2"]
    assert rows["3"].endswith("never_updated")
    assert "3 normalization layer(s), 2 with problems" in text
    assert "  1: nan: running_var is NaN in 1 of 4 channels (2)" in text


def test_inspect_checkpoint_without_norms(tmp_path):
    path = tmp_path / "linear.pt"
    torch.save({"state_dict": nn.Linear(2, 3).state_dict()}, path)
    assert inspect_checkpoint(path).endswith("no normalization layers found (no module with running statistics "
                                             "or a 1-D affine weight).")


def test_errors_for_files_that_are_not_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint '.*missing.pt' does not exist or is not a file"):
        inspect_checkpoint(tmp_path / "missing.pt")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match=r"'.*notes.txt' is not a PyTorch checkpoint \(torch.save writes a zip "
                                         r"archive\); normlab reads a state dict"):
        inspect_checkpoint(text)
    module = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), module)
    with pytest.raises(CheckpointError, match=r"holds a pickled torch.nn.modules.linear.Linear, which "
                                              r"torch.load\(weights_only=True\) refuses.*save model.state_dict\(\) "
                                              r"instead"):
        inspect_checkpoint(module)
    other = tmp_path / "other.pt"
    torch.save({"epoch": 3, "lr": 0.1}, other)
    with pytest.raises(CheckpointError, match=r"loads, but holds a dict with keys \['epoch', 'lr'\], not a state dict"):
        inspect_checkpoint(other)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(CheckpointError, match=r"is not a PyTorch checkpoint|refuses|holds a list"):
        inspect_checkpoint(raw)


# --------------------------------------------------------------------------------------------
# fold
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, input_shape", [("mlp", (1, 6, 6)), ("cnn", (3, 7, 7))])
def test_fold_writes_a_lab_checkpoint_of_the_folded_model(tmp_path, kind, input_shape):
    src, dst = tmp_path / "batch-seed1.pt", tmp_path / "out" / "folded.pt"
    model = save_lab_checkpoint(src, kind, input_shape=input_shape)
    before = src.read_bytes()
    message = fold_checkpoint(src, dst)
    assert src.read_bytes() == before
    assert message.startswith("folded 2 batch norm(s), skipped 0 (method: fx)")
    assert message.endswith(f"wrote {dst} (lab checkpoint, arm 'batch', model.norm 'none')")
    out = torch.load(dst, weights_only=True)
    assert out["arm"] == "batch" and out["config"]["model"]["norm"] == "none" and out["folded_from"] == str(src)
    # The folded file rebuilds with the lab's own builder and computes what the original did.
    rebuilt = build_model(arm_config(config_from_dict(out["config"]), out["arm"]).model, input_shape, 5)
    rebuilt.load_state_dict(out["model"], strict=True)
    x = torch.randn(16, *input_shape)
    with torch.no_grad():
        assert_relative_close(rebuilt.eval()(x), model(x), 1e-5)
    assert inspect_checkpoint(dst).endswith("no normalization layers found (no module with running statistics "
                                            "or a 1-D affine weight).")


def test_fold_arm_from_argument_and_errors(tmp_path):
    src = tmp_path / "run.pt"
    save_lab_checkpoint(src)
    with pytest.raises(CheckpointError,
                       match=r"cannot tell which arm .* pass it with arm=\.\.\., one of \['batch', 'group'\]"):
        fold_checkpoint(src, tmp_path / "out.pt")
    assert "folded 2" in fold_checkpoint(src, tmp_path / "out.pt", arm="batch")
    with pytest.raises(CheckpointError,
                       match=r"unknown arm 'bn'; the checkpoint's experiment has arms \['batch', 'group'\]"):
        fold_checkpoint(src, tmp_path / "out.pt", arm="bn")
    with pytest.raises(CheckpointError, match=r"the weights do not fit the model its config builds for arm 'group'"):
        fold_checkpoint(src, tmp_path / "out.pt", arm="group")

    group = tmp_path / "group-seed0.pt"
    save_lab_checkpoint(group, arm="group")
    with pytest.raises(CheckpointError, match=r"arm 'group' uses norm 'group': there is no batch norm to fold"):
        fold_checkpoint(group, tmp_path / "out.pt")

    after = tmp_path / "batch-seed2.pt"
    save_lab_checkpoint(after, placement="after")
    with pytest.raises(CheckpointError, match=r"2 batch norm\(s\) cannot be folded.*1.norm: its input is not a "
                                              r"Conv/ConvTranspose/Linear output but '1.act' \(ReLU\)"):
        fold_checkpoint(after, tmp_path / "out.pt")

    bare = tmp_path / "bare.pt"
    torch.save(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)).state_dict(), bare)
    with pytest.raises(CheckpointError, match=r"is a bare state dict: folding needs the model's architecture.*"
                                              r"normlab.surgery.fold_batchnorm\(model.eval\(\)\)"):
        fold_checkpoint(bare, tmp_path / "out.pt")


def test_inspect_and_fold_on_a_recurrent_lab_checkpoint(tmp_path):
    """Regression: inspect failed on a BN-LSTM checkpoint (per-step statistics (T, C) and counts
    (T,)), and could not rebuild an LSTM model (no '*.layer.weight' keys to guess shapes from)."""
    from normlab.lab.experiments import all_experiments
    from normlab.lab.trainer import Trainer

    experiment = all_experiments()["cooijmans2016-seqmnist"]
    cfg = apply_overrides(experiment.quick_config(), {
        "data.name": "synthetic", "model.widths": [6], "train.steps": 4, "train.seeds": 1, "train.eval_every": 2,
        "train.checkpoint_every": 2, "train.batch_size": 16, "train.device": "cpu"}, parse=False)
    cfg.grid = {}
    Trainer(experiment, cfg, tmp_path / "run", progress=False, jobs=1).run()
    batch = next((tmp_path / "run" / "checkpoints").glob("batch-*seed0.pt"))
    text = inspect_checkpoint(batch)
    assert "lab checkpoint of experiment 'cooijmans2016-seqmnist', arm 'batch'" in text
    assert "RecurrentBatchNorm" in text and text.endswith("3 normalization layer(s), 0 with problems")
    plain = next((tmp_path / "run" / "checkpoints").glob("none-*seed0.pt"))
    assert "lab checkpoint of experiment 'cooijmans2016-seqmnist', arm 'none'" in inspect_checkpoint(plain)
    with pytest.raises(CheckpointError, match=r"there is no batch norm to fold"):
        fold_checkpoint(plain, tmp_path / "folded.pt")
