"""The experiment hooks the trainer honours: job_config, measurements, custom_job."""

from __future__ import annotations

import pytest
import torch

from normlab.lab.experiments.registry import EXPERIMENTS
from normlab.lab.trainer import Trainer

from .small import EXPERIMENT, small_config


class Hooked(type(EXPERIMENT)):
    name = "hooked"

    def job_config(self, config):
        # A declared rule: the batch-norm arm trains twice as many steps.
        if config.model.norm != "none":
            config.train.steps *= 2
        return config

    def measurements(self, model, data, config, arm):
        return {"weights": float(sum(p.numel() for p in model.parameters())), "training": float(model.training),
                "grad_enabled": float(torch.is_grad_enabled())}


class Custom(type(EXPERIMENT)):
    name = "custom"

    def custom_job(self, job, data):
        return [{"step": 0, "arm": job.arm, "seed": job.seed, "test_acc": 0.25 + job.seed, "threads": torch.get_num_threads()}]


@pytest.fixture
def registered():
    added = {e.name: e for e in (Hooked(), Custom())}
    EXPERIMENTS.update(added)
    yield added
    for name in added:
        EXPERIMENTS.pop(name, None)


def test_job_config_and_measurements_reach_every_job(tmp_path, registered):
    config = small_config(**{"train.steps": 10, "train.eval_every": 5, "train.checkpoint_every": 5})
    config.experiment = "hooked"
    rows = Trainer(registered["hooked"], config, tmp_path / "run", progress=False, jobs=1).run()
    last = {(r["arm"], r["seed"]): r["step"] for r in rows}
    assert {arm: step for (arm, _), step in last.items()} == {"none": 10, "batch": 20}
    for row in rows:
        assert row["probes"]["training"] == 0.0 and row["probes"]["grad_enabled"] == 0.0
        assert row["probes"]["weights"] > 0


def test_custom_job_rows_replace_training(tmp_path, registered):
    config = small_config()
    config.experiment = "custom"
    rows = Trainer(registered["custom"], config, tmp_path / "run", progress=False, jobs=1).run()
    assert sorted((r["arm"], r["seed"], r["test_acc"]) for r in rows) == [
        ("batch", 0, 0.25), ("batch", 1, 1.25), ("none", 0, 0.25), ("none", 1, 1.25)]
    assert {r["threads"] for r in rows} == {1}


class Refusing(type(EXPERIMENT)):
    name = "refusing"

    def job_config(self, config):
        if config.model.norm == "batch":
            from normlab.lab.config import ConfigError

            raise ConfigError("refusing: the batch arm cannot train with this config")
        return config


def test_a_job_config_error_stops_the_run_before_its_folder_exists(tmp_path):
    from normlab.lab.config import ConfigError

    EXPERIMENTS["refusing"] = Refusing()
    try:
        config = small_config()
        config.experiment = "refusing"
        with pytest.raises(ConfigError, match=r"refusing: the batch arm cannot train"):
            Trainer(EXPERIMENTS["refusing"], config, tmp_path / "run", progress=False, jobs=1)
        assert not (tmp_path / "run").exists()
    finally:
        EXPERIMENTS.pop("refusing", None)
