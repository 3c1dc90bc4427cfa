"""Issue 15 item 7: every mistake the command line meets ends in one line on stderr and exit code
2, never a traceback; a refused command writes nothing, so the corrected one can use the same --out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from normlab.cli import main

from .test_data import write_mnist

# A run of a few seconds: synthetic data, small network, one seed, one process.
SMALL = ["run", "ioffe2015-mnist", "--quick", "--no-progress", "--jobs", "1", "--seeds", "1", "--steps", "10",
         "--data", "synthetic", "--device", "cpu", "--set", "model.widths=[8]", "--set", "train.eval_every=5",
         "--set", "train.checkpoint_every=5"]


def _out(tmp: Path, name: str = "run") -> list[str]:
    return ["--out", str(tmp / name)]


def _file(tmp: Path, name: str, text: str = "") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def _idx_run(tmp: Path, **files) -> list[str]:
    """A run on MNIST-format files in tmp/data, with some of them replaced by ``files``."""
    write_mnist(tmp / "data", n_train=80, n_test=20, shape=(4, 4))
    for name, array in files.items():
        from .test_data import write_idx

        write_idx(tmp / "data" / name.replace("_", "-"), array)
    return [a if a != "synthetic" else "mnist" for a in SMALL] + ["--data-dir", str(tmp / "data"), *_out(tmp)]


def _resume_with_checkpoint(tmp: Path, content: bytes | None) -> list[str]:
    """A finished small run whose job batch-seed0 is made unfinished, with its checkpoint replaced."""
    assert main([*SMALL, *_out(tmp)]) == 0
    (tmp / "run" / "jobs" / "batch-seed0.jsonl").unlink()
    checkpoint = tmp / "run" / "checkpoints" / "batch-seed0.pt"
    whole = checkpoint.read_bytes()
    checkpoint.write_bytes(whole[: len(whole) // 2] if content is None else content)
    return [*SMALL, "--resume", *_out(tmp)]


CASES = {
    # --out
    "out-in-proc": (lambda tmp: [*SMALL, "--out", "/proc/normlab-x"], "'/proc/normlab-x' cannot be created"),
    "out-is-a-file": (lambda tmp: [*SMALL, "--out", str(_file(tmp, "f"))], "is an existing file, not a folder"),
    "out-below-a-file": (lambda tmp: [*SMALL, "--out", str(_file(tmp, "f") / "sub")], "is a file, not a folder"),
    "reproduce-out-is-a-file": (lambda tmp: ["reproduce", "--quick", "--experiments", "ioffe2015-mnist", "--data",
                                             "synthetic", "--jobs", "1", "--no-progress", "--out", str(_file(tmp, "f"))],
                                "/f/ioffe2015-mnist' cannot be created: "),
    # --config
    "config-is-a-folder": (lambda tmp: [*SMALL, "--config", str(tmp), *_out(tmp)], "is a folder; give a TOML file"),
    "arms-is-a-number": (lambda tmp: [*SMALL, "--config", str(_file(tmp, "a.toml", "arms = 5\n")), *_out(tmp)],
                         "arms must be a table of arms"),
    "arms-is-a-list": (lambda tmp: [*SMALL, "--config", str(_file(tmp, "a.toml", "arms = [1]\n")), *_out(tmp)],
                       "arms must be a table of arms"),
    "arm-is-a-number": (lambda tmp: [*SMALL, "--config", str(_file(tmp, "a.toml", "[arms]\nnone = 3\n")), *_out(tmp)],
                        "arm 'none' must be a table of config keys"),
    "grid-is-a-number": (lambda tmp: [*SMALL, "--config", str(_file(tmp, "a.toml", "grid = 3\n")), *_out(tmp)],
                         "grid must be a table of axes"),
    "config-not-text": (lambda tmp: [*SMALL, "--config", str(_binary(tmp)), *_out(tmp)], "cannot be read as text"),
    # values no job can train with
    "negative-lr": (lambda tmp: [*SMALL, "--set", "train.lr=-1", *_out(tmp)], "train.lr must be a finite number > 0"),
    "nan-lr": (lambda tmp: [*SMALL, "--set", "train.lr=nan", *_out(tmp)], "train.lr must be a finite number > 0"),
    "momentum-1.5": (lambda tmp: [*SMALL, "--set", "train.momentum=1.5", *_out(tmp)], "train.momentum must be in [0, 1)"),
    "target-accuracy": (lambda tmp: [*SMALL, "--set", "params.target_accuracy=-1", *_out(tmp)],
                        "params.target_accuracy is a test accuracy"),
    # --resume from a damaged job checkpoint
    "resume-truncated": (lambda tmp: _resume_with_checkpoint(tmp, None), "damaged or truncated"),
    "resume-empty": (lambda tmp: _resume_with_checkpoint(tmp, b""), "is empty (0 bytes)"),
    "resume-garbage": (lambda tmp: _resume_with_checkpoint(tmp, bytes(range(256)) * 8), "not a PyTorch checkpoint"),
    "resume-not-a-job": (lambda tmp: _resume_with_checkpoint(tmp, _torch_bytes({"a": torch.ones(2)})),
                         "not one that normlab run writes"),
    # IDX files
    "idx-no-images": (lambda tmp: _idx_run(tmp, train_images_idx3_ubyte=np.zeros((0, 4, 4))), "holds no images"),
    "idx-zero-size": (lambda tmp: _idx_run(tmp, t10k_images_idx3_ubyte=np.zeros((20, 0, 4))), "images of 0x4 pixels"),
    "idx-other-size": (lambda tmp: _idx_run(tmp, t10k_images_idx3_ubyte=np.zeros((20, 5, 5))),
                       "are 4x4 pixels but the test images"),
    # inspect / fold on files that are not checkpoints
    "inspect-text": (lambda tmp: ["inspect", str(_file(tmp, "notes.txt", "hello"))], "is not a PyTorch checkpoint"),
    "inspect-empty": (lambda tmp: ["inspect", str(_file(tmp, "e.pt"))], "is empty (0 bytes)"),
    "inspect-module": (lambda tmp: ["inspect", str(_module(tmp))], "holds a pickled torch.nn.modules.linear.Linear"),
    "fold-garbage": (lambda tmp: ["fold", str(_garbage(tmp)), str(tmp / "o.pt")], "is not a PyTorch checkpoint"),
}


def _binary(tmp: Path) -> Path:
    path = tmp / "b.toml"
    path.write_bytes(b"\xff\xfe\x00 lr")
    return path


def _torch_bytes(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _module(tmp: Path) -> Path:
    path = tmp / "module.pt"
    path.write_bytes(_torch_bytes(torch.nn.Linear(2, 2)))
    return path


def _garbage(tmp: Path) -> Path:
    path = tmp / "g.pt"
    path.write_bytes(b"GARBAGE" * 100)
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_item_7_each_cli_mistake_is_one_line_and_exit_2(case, tmp_path, capfd):
    if case == "out-in-proc" and not Path("/proc").is_dir():
        pytest.skip("needs Linux's /proc")
    make_args, message = CASES[case]
    args = make_args(tmp_path)
    capfd.readouterr()  # what a preparing run printed
    assert main(args) == 2
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("normlab: ioffe2015-mnist: ")]
    assert len(lines) == 1 and lines[0].startswith("normlab: error: ") and message in lines[0], err
    assert "Traceback" not in err and "\x1b" not in err and "PyTorch 2.6" not in err


def test_item_7_the_real_command_prints_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "normlab", *SMALL, "--out", str(_file(tmp_path, "f") / "sub")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr


def test_item_7_a_refused_config_leaves_the_folder_free_for_the_fixed_command(tmp_path, capfd):
    assert main([*SMALL, "--set", "train.lr=-1", *_out(tmp_path)]) == 2
    assert not (tmp_path / "run" / "config.json").exists()
    assert main([*SMALL, "--set", "train.lr=0.5", *_out(tmp_path)]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["lr"] == 0.5


def test_item_7_a_refused_folder_prints_no_run_header(tmp_path, capfd):
    """The folder is checked before the command announces the run: the error is all it prints."""
    assert main([*SMALL, "--out", str(_file(tmp_path, "f"))]) == 2
    assert capfd.readouterr().err.count("\n") == 1


def test_item_7_nested_arm_tables_in_toml_are_dotted_keys(tmp_path, capfd):
    toml = _file(tmp_path, "arms.toml", '[arms.bn]\nmodel.norm = "batch"\n\n[arms.gn]\n"model.norm" = "layer"\n')
    assert main([*SMALL, "--config", str(toml), *_out(tmp_path)]) == 0
    arms = json.loads((tmp_path / "run" / "config.json").read_text())["arms"]
    assert arms == {"bn": {"model.norm": "batch"}, "gn": {"model.norm": "layer"}}
