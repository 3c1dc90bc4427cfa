"""Learning from augmented data: the test accuracy that random shifts and rotations add, with and
without batch norm.

Claim tested: C16, batch norm helps the network learn from augmented data. There is no published
figure for it: the claim is a common statement, not a measured result, so the lab states it as
"the gain from augmentation is larger with batch norm".

Setup: the lab's ReLU CNN (four 3x3 conv blocks of 8, 16, 32, 32 channels, the last three with
stride 2, then global average pooling and a linear layer; He initialization), trained on the
first 500 training digits of the embedded MNIST subset and tested on the 1,000 held-out digits;
SGD with momentum 0.9, learning rate 0.02, batch 50. A convolutional network because shifts and
rotations are what convolutions and pooling partly absorb: the question is whether batch norm
changes how much the rest is learned from data; a small training set because there the
augmented copies add information the network lacks. Arms: no norm ("none") and batch norm
before each ReLU ("batch"), each trained without augmentation and with ``data.augment =
"shift+rotate"`` (the grid axis): every training image moved by up to 10% of its side along each
axis and rotated by up to 15 degrees, drawn anew at every step from the job's seed and the step
(:mod:`normlab.lab.augment`; arms of one seed see the same draws). Test digits are never
augmented. Train accuracy (eval mode, un-augmented training digits) is recorded at each evaluation.

Statistics, per seed, from the last evaluation, in percentage points (pts):
``gain(arm) = test_acc(arm, shift+rotate) - test_acc(arm, none)``, and **C16**:
``gain(batch) - gain(none)``. Rule: greater than 0 (95% CI over seeds) and an estimate of at
least ``params.gain_band`` (1 pt) for "supported" (a CI above 0 with a smaller estimate is
"mixed": the direction holds, the size does not matter), a CI within ``+-params.gain_band``
being no effect worth the name ("not supported"). Reported without a verdict: each
arm's gain and its accuracies.

Forms: full, 2,000 steps (200 epochs of the 500 digits), 5 seeds, evaluated every 100 steps;
quick, 800 steps, 3 seeds, every 100 steps (141 s of user CPU with ``--jobs 2``; 220 s on an
overloaded machine).

>>> from normlab.lab.experiments.augmentation import Augmentation
>>> cfg = Augmentation().quick_config()
>>> cfg.grid, cfg.model.kind, cfg.data.limit
({'data.augment': ['none', 'shift+rotate']}, 'cnn', 500)
"""

from __future__ import annotations

from statistics import fmean
from typing import Any

from ..config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig, apply_overrides
from ..intervals import mean_ci
from ..verdicts import Rule
from ._two_by_two import diverged_notes, finals_by_seed, group_jobs, paired, points_ci
from .base import Experiment, FigureSpec, Summary
from .registry import register

__all__ = ["Augmentation"]

AXIS = "data.augment"
PUBLISHED = [
    "No published measurement: \"batch norm helps the network learn from augmented data\" is a common statement. "
    "Related: Ioffe & Szegedy 2015 (Sec. 4.2.1) reduced the photometric distortions when training BN-Inception: "
    "a network that trains faster sees each example fewer times, so they let it see more undistorted images.",
]


class Augmentation(Experiment):
    name = "augmentation"
    claim = "C16: batch norm helps the network learn from augmented data"
    title = "Augmentation on 500 digits: the test accuracy random shifts and rotations add, BN vs none"
    description = ("small ReLU CNN on 500 MNIST digits with and without random shifts+rotations, BN vs none: "
                   "test accuracy and the gain from augmentation")
    claims = ("C16",)
    figures = (
        FigureSpec(
            kind="grid", metric="test_acc", axis=AXIS, reduce="final",
            title="Final test accuracy without and with augmentation", ylabel="test accuracy",
            caption="At the last evaluation; each arm's gain from augmentation is the rise from 'none' to "
                    "'shift+rotate'. Points: mean over seeds; bars: the seeds' minimum to maximum.",
        ),
        FigureSpec(
            kind="curve", metric="test_acc", panel=AXIS, title="Test accuracy during training", ylabel="test accuracy",
            caption="One panel per augmentation. Mean over seeds; the band spans the seeds' minimum to maximum.",
        ),
        FigureSpec(
            kind="curve", metric="train_acc", panel=AXIS, title="Train accuracy during training (eval mode, "
                                                                "un-augmented digits)",
            ylabel="train accuracy",
            caption="Accuracy on the 500 training digits as they are (no shift or rotation), in eval mode. Mean over "
                    "seeds; the band spans the seeds' minimum to maximum.",
        ),
        FigureSpec(
            kind="curve", metric="train_loss", panel=AXIS, title="Training loss (on the batches trained on)",
            ylabel="cross-entropy (mean since last evaluation)", logy=True,
            caption="In training mode, on the (augmented, where the panel says so) batches. Mean over seeds; the band "
                    "spans the seeds' minimum to maximum.",
        ),
    )

    def default_config(self) -> ExperimentConfig:
        return ExperimentConfig(
            experiment=self.name,
            data=DataConfig(name="mnist-5k", limit=500, augment_shift=0.1, augment_degrees=15.0),
            # Four blocks: with global average pooling three blocks see too small a patch to read a whole
            # digit (wu-he2018-batch-size's pilot); 8-32 channels keep the quick form within its CPU budget.
            model=ModelConfig(kind="cnn", widths=[8, 16, 32, 32], activation="relu", init_gain=2 ** 0.5),
            train=TrainConfig(steps=2000, batch_size=50, optimizer="sgd", lr=0.02, momentum=0.9, seeds=5,
                              eval_every=100, checkpoint_every=1000, eval_train=True),
            arms={"none": {"model.norm": "none"}, "batch": {"model.norm": "batch"}},
            grid={AXIS: ["none", "shift+rotate"]},
            params={"gain_band": 1.0},
        )

    def quick_config(self) -> ExperimentConfig:
        return apply_overrides(self.default_config(), {"train.steps": 800, "train.seeds": 3}, parse=False)

    def rules(self, params: dict[str, Any]) -> Rule:
        """The verdict rule, fixed before the run by the params (C16)."""
        return Rule(
            "C16", "gain in final test accuracy from augmentation, batch norm's minus no norm's (points)",
            expected="augmentation raises batch norm's test accuracy more than the plain network's (95% CI above 0)",
            null=0.0, direction="greater", target=params.get("gain_band", 1.0), equivalence=params.get("gain_band", 1.0),
            unit=" pts", digits=1,
            published="none (a common statement)", label="gain BN - gain none",
        )

    def summarize(self, rows: list[dict[str, Any]], config: dict[str, Any]) -> Summary:
        params = config.get("params", {})
        rule = self.rules(params)
        jobs = group_jobs(rows)
        levels = list(config.get("grid", {}).get(AXIS) or sorted({dict(j.point).get(AXIS) for j in jobs} - {None}))
        plain = "none" if "none" in levels else (levels[0] if levels else None)
        augmented = [level for level in levels if level != plain]
        aug = augmented[-1] if augmented else None
        arms = [a for a in (config.get("arms") or {}) if any(j.arm == a for j in jobs)] or sorted({j.arm for j in jobs})

        def f(arm: str, level: Any, key: str = "test_acc") -> dict[Any, float]:
            return finals_by_seed(jobs, arm, AXIS, level, key)

        def gain(arm: str) -> dict[Any, float]:
            return dict(zip(sorted(set(f(arm, aug)) & set(f(arm, plain))), paired(f(arm, aug), f(arm, plain))))

        table = []
        for arm in arms:
            cells = [points_ci(list(f(arm, level).values()), bounds=(0, 1)) for level in levels]
            trains = [points_ci(list(f(arm, level, "train_acc").values()), bounds=(0, 1)) for level in levels]
            table.append([arm, *cells, *trains, points_ci(list(gain(arm).values()), signed=True)])

        diff = [100 * d for d in paired(gain("batch"), gain("none"))] if aug is not None else []
        finding = rule.decide(*(mean_ci(diff) if diff else (None,) * 3), n=len(diff),
                              note="" if aug is not None else f"the grid has no augmented level besides {plain!r}")
        headline = (f"Augmentation ({aug}) raised batch norm's test accuracy by {points_ci(list(gain('batch').values()), signed=True)} "
                    f"pts and the plain network's by {points_ci(list(gain('none').values()), signed=True)} pts: "
                    f"batch norm's gain minus the plain one's is {finding.text} (mean over {len(diff)} seeds, 95% CI)."
                    if aug is not None else "no augmented jobs to compare.")
        notes = diverged_notes(jobs) + self._notes(f, gain, plain, aug)
        return Summary.of_findings(
            self, [finding], headline=headline,
            columns=["arm", *(f"test % ({level})" for level in levels), *(f"train % ({level})" for level in levels),
                     "gain (pts)"],
            rows=table, published=PUBLISHED, notes=notes,
        )

    @staticmethod
    def _notes(f, gain, plain: Any, aug: Any) -> list[str]:
        """What the numbers show, in words (written from the run's values, whatever they are)."""
        if aug is None:
            return []
        mean = lambda d: fmean(d.values()) if d else None  # noqa: E731
        acc = {(arm, level): mean(f(arm, level)) for arm in ("none", "batch") for level in (plain, aug)}
        gains = {arm: mean(gain(arm)) for arm in ("none", "batch")}
        if None in acc.values() or None in gains.values():
            return []
        notes = [
            f"Without augmentation batch norm ends at {100 * acc['batch', plain]:.1f}% test accuracy and the plain "
            f"network at {100 * acc['none', plain]:.1f}%; with it, at {100 * acc['batch', aug]:.1f}% and "
            f"{100 * acc['none', aug]:.1f}%. "
            + ("Both networks gain from augmentation" if min(gains.values()) > 0 else
               "Augmentation does not help both networks")
            + (f"; batch norm gains more ({100 * gains['batch']:+.1f} vs {100 * gains['none']:+.1f} pts)."
               if gains["batch"] > gains["none"] else
               f"; batch norm gains less or no more ({100 * gains['batch']:+.1f} vs {100 * gains['none']:+.1f} pts): "
               f"a network that already generalizes better has less left for augmentation to add, so a smaller "
               f"gain need not mean batch norm learns less from it." if acc["batch", plain] > acc["none", plain] else
               f"; batch norm gains less or no more ({100 * gains['batch']:+.1f} vs {100 * gains['none']:+.1f} pts).")
        ]
        before, after = acc["batch", plain] - acc["none", plain], acc["batch", aug] - acc["none", aug]
        notes.append(
            f"Batch norm minus no norm, test accuracy: {100 * before:+.1f} pts without augmentation and "
            f"{100 * after:+.1f} pts with it"
            + (": batch norm's CNN generalizes worse than the plain one here, and augmentation "
               + ("narrows" if abs(after) < abs(before) else "does not narrow") + " the difference."
               if before < -0.01 else
               ": augmentation " + ("narrows" if abs(after) < abs(before) else "does not narrow")
               + " the difference between the networks.")
        )
        train_aug = {arm: mean(f(arm, aug, "train_acc")) for arm in ("none", "batch")}
        if None not in train_aug.values() and min(train_aug.values()) < 0.99:
            notes.append("With augmentation the networks fit the un-augmented training digits less than fully "
                         f"(train accuracy: none {100 * train_aug['none']:.1f}%, batch {100 * train_aug['batch']:.1f}%): "
                         "the augmented task is harder, and a longer run may raise both accuracies. Batch norm's "
                         "running statistics are those of augmented batches, while these digits and the test digits "
                         "are not augmented, which may cost it more than the plain network.")
        notes.append("Scope: one augmentation strength (shifts up to 10% of the side, rotations up to 15 degrees), one "
                     "small CNN, 500 training digits and one learning rate shared by both arms; the gain depends on "
                     "all of these. The claim has no published measurement to compare with.")
        return notes


register(Augmentation())
