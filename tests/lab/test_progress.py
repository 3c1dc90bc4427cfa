"""Issue 15 item 8: progress on stderr: plain lines every few percent when it is not a terminal
(a log file got 1,300 carriage returns from the bar), a bar on a terminal, nothing with
--no-progress; and the one-time kernel build notice is a logged warning."""

from __future__ import annotations

import io
import logging
import re

import pytest

from normlab import kernels
from normlab.cli import main
from normlab.lab.progress import PlainProgress, progress_display
from normlab.lab.trainer import Trainer

from .small import EXPERIMENT, small_config

LINE = re.compile(r"normlab: (\d+)% \(([\d,]+) of ([\d,]+) steps, \d+ s(, about \d+ s left)?\)")


def test_item_8_plain_progress_prints_a_line_every_5_percent():
    stream = io.StringIO()
    with progress_display(1300, stream=stream) as bar:
        assert isinstance(bar, PlainProgress)
        for _ in range(1300):  # one update per step, as a bar would redraw
            bar.update(1)
    text = stream.getvalue()
    assert "\r" not in text
    percents = [int(LINE.fullmatch(line).group(1)) for line in text.splitlines()]
    assert percents == list(range(5, 101, 5))


def test_item_8_a_terminal_gets_the_bar_and_no_progress_gets_nothing():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    from tqdm.auto import tqdm

    terminal = Terminal()
    with progress_display(10, stream=terminal) as bar:
        assert isinstance(bar, tqdm)
        bar.update(10)
    silent = io.StringIO()
    with progress_display(10, enabled=False, stream=silent) as bar:
        bar.update(10)
    assert silent.getvalue() == ""


def test_item_8_a_run_logs_plain_progress_lines(tmp_path, capsys):
    config = small_config(**{"train.steps": 40, "train.seeds": 1})
    Trainer(EXPERIMENT, config, tmp_path / "run", progress=True).run()
    err = capsys.readouterr().err
    assert "\r" not in err
    matches = [LINE.fullmatch(line) for line in err.splitlines()]
    assert all(matches), err
    percents = [int(m.group(1)) for m in matches]
    assert percents == sorted(set(percents)) and percents[-1] == 100 and len(percents) <= 20
    assert {m.group(3) for m in matches} == {"80"}  # 2 arms x 40 steps


def test_item_8_no_progress_is_silent(tmp_path, capsys):
    code = main(["run", "ioffe2015-mnist", "--quick", "--no-progress", "--jobs", "1", "--seeds", "1", "--steps", "10",
                 "--data", "synthetic", "--device", "cpu", "--set", "model.widths=[8]", "--set", "train.eval_every=5",
                 "--out", str(tmp_path / "run")])
    assert code == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("normlab: ioffe2015-mnist: "), err  # the run's header alone


def test_item_8_the_kernel_build_notice_is_a_logged_warning_once(monkeypatch, caplog):
    from torch.utils import cpp_extension

    builds = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: builds.append(kw["name"]) or "built module")
    monkeypatch.setattr(kernels, "_needs_build", lambda name: True)
    monkeypatch.setattr(kernels, "disabled", lambda: False)
    monkeypatch.setattr(kernels.sys, "platform", "linux")
    monkeypatch.setattr(kernels, "_state", {})
    with caplog.at_level(logging.WARNING, logger="normlab.kernels"):
        assert kernels.channels_last() == "built module"
        assert kernels.channels_last() == "built module"
    notices = [r for r in caplog.records if r.name == "normlab.kernels"]
    assert len(builds) == 1 and len(notices) == 1
    assert notices[0].levelno == logging.WARNING and "compiling" in notices[0].getMessage()


def test_item_8_no_build_notice_when_the_kernel_is_cached(monkeypatch, caplog):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", lambda **kw: "cached module")
    monkeypatch.setattr(kernels, "_needs_build", lambda name: False)
    monkeypatch.setattr(kernels, "disabled", lambda: False)
    monkeypatch.setattr(kernels.sys, "platform", "linux")
    monkeypatch.setattr(kernels, "_state", {})
    with caplog.at_level(logging.DEBUG, logger="normlab.kernels"):
        assert kernels.channels_last() == "cached module"
    assert not [r for r in caplog.records if r.name == "normlab.kernels"]


@pytest.mark.skipif(kernels.disabled(), reason="NORMLAB_NO_EXTENSION set")
def test_item_8_needs_build_sees_torchs_extension_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert kernels._needs_build("normlab_channels_last_test")
    folder = tmp_path / "normlab_channels_last_test"
    folder.mkdir(exist_ok=True)  # torch creates it when asked where it is
    (folder / "normlab_channels_last_test.so").write_bytes(b"")
    assert not kernels._needs_build("normlab_channels_last_test")
