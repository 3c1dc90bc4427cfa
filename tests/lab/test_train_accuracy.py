"""train.eval_train: the eval-mode loss and accuracy on the training split in each metrics row,
checked against the trained model recomputed independently from its checkpoint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from normlab.lab import job as job_module
from normlab.lab.checkpoint import load_job_checkpoint, rebuild_model
from normlab.lab.data import load_dataset
from normlab.lab.experiments.base import FigureSpec
from normlab.lab.figures import plot_figure
from normlab.lab.rows import final, group_jobs, value
from normlab.lab.trainer import Trainer

from .small import EXPERIMENT, small_config

KEYS = {"train_acc", "train_eval_loss", "train_test_gap"}


def recomputed(run, arm, seed, limit=None):
    """(loss, accuracy) of the job's final model on its training split, in eval mode, in float64."""
    path = run / "checkpoints" / f"{arm}-seed{seed}.pt"
    state = load_job_checkpoint(path)
    model, _, cfg, _ = rebuild_model(state["model"], state, path, arm)
    data = load_dataset(cfg.data.name, test_fraction=cfg.data.test_fraction, split_seed=cfg.data.split_seed,
                        limit=cfg.data.limit)
    x, y = data.x_train[:limit], data.y_train[:limit]
    with torch.no_grad():
        logits = model.double().eval()(x.double())
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).double().mean().item()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    # Dropout makes train mode and eval mode differ: the row must hold the eval-mode numbers.
    root = tmp_path_factory.mktemp("train-acc") / "run"
    rows = Trainer(EXPERIMENT, small_config(**{"train.eval_train": True, "model.dropout": 0.3}), root,
                   progress=False).run()
    return root, rows


def test_train_accuracy_is_the_eval_mode_accuracy_on_the_training_split(run):
    root, rows = run
    jobs = group_jobs(rows)
    for job, job_rows in jobs.items():
        loss, acc = recomputed(root, job.arm, job.seed)
        assert final(job_rows, "train_acc") == pytest.approx(acc, abs=1e-12)
        assert final(job_rows, "train_eval_loss") == pytest.approx(loss, rel=1e-4)
    assert all(KEYS <= set(r) for r in rows)
    for r in rows:
        assert r["train_test_gap"] == pytest.approx(r["train_acc"] - r["test_acc"], abs=1e-12)
    # It is measured on the training split, not the test split: the two accuracies differ somewhere.
    assert any(r["train_acc"] != r["test_acc"] for r in rows)


def test_rows_helpers_and_figures_find_the_train_accuracy(run):
    _, rows = run
    assert value(rows[-1], "train_acc") == rows[-1]["train_acc"]
    spec = FigureSpec(kind="curve", metric="train_acc", title="train accuracy", ylabel="train accuracy")
    fig = plot_figure(spec, rows)
    assert len(fig.axes[0].lines) == 2  # one line per arm, none drawn as "no values"


def test_without_eval_train_rows_have_no_train_accuracy(tmp_path):
    rows = Trainer(EXPERIMENT, small_config(**{"train.steps": 10}), tmp_path / "run", progress=False).run()
    assert not any(KEYS & set(r) for r in rows)


def test_train_accuracy_reads_at_most_the_first_train_eval_limit_samples(tmp_path, monkeypatch):
    monkeypatch.setattr(job_module, "TRAIN_EVAL_LIMIT", 37)
    root = tmp_path / "run"
    rows = Trainer(EXPERIMENT, small_config(**{"train.eval_train": True, "train.steps": 10}), root,
                   progress=False).run()
    for job, job_rows in group_jobs(rows).items():
        _, acc = recomputed(root, job.arm, job.seed, limit=37)
        assert final(job_rows, "train_acc") == pytest.approx(acc, abs=1e-12)
        assert round(final(job_rows, "train_acc") * 37, 9).is_integer()
