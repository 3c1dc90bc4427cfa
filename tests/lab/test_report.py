"""normlab.lab.report: run folder -> summary.json, report.html, report.md and figures, from the metrics alone."""

from __future__ import annotations

import html
import json
import math
import re
import warnings

import pytest

from normlab.lab.experiments.base import Experiment, FigureSpec, Summary
from normlab.lab.report import format_summary_table, load_run, plot_figure, write_report

ARMS = ("none", "batch")
SEEDS = (0, 1, 2)
STEPS = (0, 50, 100, 150)


def make_rows(arms=ARMS, seeds=SEEDS, steps=STEPS):
    """Synthetic metrics, interleaved as the trainer writes them: for each step, every arm and seed."""
    rows = []
    for step in steps:
        for a, arm in enumerate(arms):
            for seed in seeds:
                acc = 0.1 + (0.5 + 0.3 * a) * (1 - math.exp(-step / 60)) + 0.01 * seed
                spread = 2.0 / (1 + a) * (1 + step / 150)
                rows.append({
                    "step": step, "arm": arm, "seed": seed,
                    "train_loss": None if step == 0 else 2.3 * math.exp(-step / (80 + 40 * a)) + 0.01 * seed,
                    "test_loss": 2.3 * math.exp(-step / (90 + 40 * a)) + 0.02 * seed,
                    "test_acc": acc,
                    "wall_time": 0.5 * step / 50,
                    "probes": {"h1_p15": -spread + 0.1 * seed, "h1_p50": 0.2 * a + 0.05 * seed, "h1_p85": spread + 0.1 * seed},
                })
    return rows


class FakeExperiment(Experiment):
    """Summarizes for real: the final mean test accuracy per arm, supported if the second arm wins."""

    name = "fake"
    claim = "C0: batch norm makes <fake> training faster"
    title = "Fake experiment & friends"
    description = "Two arms, three seeds, synthetic metrics."
    figures = (
        FigureSpec(kind="curve", title="Test accuracy", ylabel="test accuracy", metric="test_acc", caption="Mean over seeds; band: min..max."),
        FigureSpec(kind="curve", title="Training loss", ylabel="training loss", metric="train_loss", logy=True),
        FigureSpec(kind="percentiles", title="Hidden unit input", ylabel="input to sigmoid", probe="h1", caption="15th, 50th, 85th percentiles."),
    )

    def default_config(self):
        return None

    def quick_config(self):
        return None

    def summarize(self, rows, config):
        final = max(r["step"] for r in rows)
        arms = list(dict.fromkeys(r["arm"] for r in rows))
        acc = {arm: [r["test_acc"] for r in rows if r["arm"] == arm and r["step"] == final] for arm in arms}
        mean = {arm: sum(v) / len(v) for arm, v in acc.items()}
        better = mean[arms[-1]] > mean[arms[0]]
        return Summary(
            experiment=self.name,
            claim=self.claim,
            verdict="supported" if better else "not supported",
            expected=f"{arms[-1]} ends more accurate than {arms[0]}",
            met=better,
            headline=f"final accuracy {mean[arms[-1]]:.3f} vs {mean[arms[0]]:.3f}",
            columns=["arm", "final test acc", "seeds"],
            rows=[[arm, f"{mean[arm]:.4f}", str(len(acc[arm]))] for arm in arms],
            published=["Ioffe & Szegedy 2015, Fig. 1a: BN reaches higher accuracy sooner"],
            notes=["synthetic data"],
        )


def write_run(path, rows=None, config=None):
    path.mkdir(parents=True, exist_ok=True)
    config = config if config is not None else {"experiment": "fake", "train": {"steps": STEPS[-1], "lr": 0.1}, "arms": list(ARMS)}
    (path / "config.json").write_text(json.dumps(config))
    rows = make_rows() if rows is None else rows
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    run = write_run(tmp_path_factory.mktemp("run") / "r1")
    paths = write_report(run, experiment=FakeExperiment())
    return run, paths


# ---- write_report


def test_write_report_writes_every_file(built):
    run, paths = built
    assert set(paths) == {"html", "md", "summary"}
    for key, name in (("html", "report.html"), ("md", "report.md"), ("summary", "summary.json")):
        assert paths[key] == run / name and paths[key].is_file()
    pngs = sorted((run / "figures").glob("*.png"))
    assert len(pngs) == len(FakeExperiment.figures)
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)
    assert not list(run.rglob("*.tmp")), "atomic writes left temp files behind"


def test_summary_json_is_the_summary(built):
    run, paths = built
    summary = json.loads(paths["summary"].read_text())
    assert summary == FakeExperiment().summarize(load_run(run)[1], {}).to_dict()
    assert summary["verdict"] == "supported" and summary["met"] is True


def test_html_is_self_contained(built):
    _, paths = built
    text = paths["html"].read_text()
    assert text.count("data:image/png;base64,") == len(FakeExperiment.figures)
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"""(src|href)\s*=\s*["']?(?!data:)[a-z]+:""", text, re.I)
    assert "<link" not in text and "<script" not in text


def test_html_puts_summary_before_figures(built):
    _, paths = built
    text = paths["html"].read_text()
    first_figure = text.index("<figure")
    summary = FakeExperiment().summarize(make_rows(), {})
    for value in ["supported", summary.headline, *[c for row in summary.rows for c in row], *summary.published, "synthetic data"]:
        assert 0 <= text.index(html.escape(value)) < first_figure, value
    assert 'class="badge v-supported"' in text
    assert text.index("<details>") > first_figure and "normlab report " in text
    # The run section lists arms, seeds and steps; the config is in a collapsible block.
    run_section = text[text.index('id="run"'):]
    assert "none, batch" in run_section and "0, 1, 2" in run_section and "0 to 150" in run_section
    assert "&quot;lr&quot;: 0.1" in run_section


def test_markdown_layout(built):
    run, paths = built
    text = paths["md"].read_text()
    assert text.startswith("# Fake experiment & friends\n")
    first_figure = text.index("![")
    assert text.index("**Verdict: supported.**") < text.index("| arm | final test acc | seeds |") < first_figure
    for png in (run / "figures").glob("*.png"):
        assert f"](figures/{png.name})" in text
    assert "```json\n" in text and f"normlab report {run}" in text


def test_rebuild_is_identical(built):
    run, paths = built
    before = {key: path.read_bytes() for key, path in paths.items()}
    figures = {p.name: p.read_bytes() for p in (run / "figures").glob("*.png")}
    again = write_report(run, experiment=FakeExperiment())
    assert {key: path.read_bytes() for key, path in again.items()} == before
    assert {p.name: p.read_bytes() for p in (run / "figures").glob("*.png")} == figures


def test_html_escapes_text(tmp_path):
    arm = "<b>x</b>"
    run = write_run(tmp_path / "r", rows=make_rows(arms=("none", arm), steps=(0, 50)))
    experiment = FakeExperiment()
    experiment.figures = (FigureSpec(kind="curve", title="<i>acc</i>", ylabel="y", metric="test_acc", caption="a < b"),)
    text = write_report(run, experiment=experiment)["html"].read_text()
    assert 'alt="&lt;i&gt;acc&lt;/i&gt;"' in text and "a &lt; b" in text
    assert arm not in text and "&lt;b&gt;x&lt;/b&gt;" in text
    assert "<fake>" not in text and "&lt;fake&gt;" in text  # the claim
    assert "Fake experiment &amp; friends" in text
    md = (run / "report.md").read_text()
    assert arm not in md and r"\<b\>x\</b\>" in md


def test_experiment_looked_up_by_name(tmp_path):
    run = write_run(tmp_path / "r", config={"experiment": "no-such-experiment"})
    with pytest.raises(ValueError, match="no-such-experiment"):
        write_report(run)
    run = write_run(tmp_path / "s", config={"train": {}})
    with pytest.raises(ValueError, match="no 'experiment' key"):
        write_report(run)


def test_format_summary_table():
    summary = FakeExperiment().summarize(make_rows(), {})
    text = format_summary_table(summary)
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("arm"))
    assert set(lines[header + 1]) <= {"-", " "}
    assert lines[header + 2].split() == summary.rows[0]
    assert "verdict: supported (expected outcome met)" in text and summary.headline in text
    assert "published: Ioffe" in text and "note: synthetic data" in text
    # Cells line up under their headers.
    assert lines[header + 2].index(summary.rows[0][1]) == lines[header].index("final test acc")


# ---- load_run


def test_load_run_round_trip(tmp_path):
    run = write_run(tmp_path / "r")
    config, rows = load_run(run)
    assert config["experiment"] == "fake" and rows == make_rows()


def test_load_run_missing(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "r").mkdir()
    with pytest.raises(ValueError, match="config.json is missing"):
        load_run(tmp_path / "r")
    (tmp_path / "r" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="metrics.jsonl is missing"):
        load_run(tmp_path / "r")


def test_load_run_bad_json_names_file_and_line(tmp_path):
    run = write_run(tmp_path / "r")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-1] + ",}"
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 3 is not valid JSON"):
        load_run(run)
    (run / "metrics.jsonl").write_text('{"step": 0}\n[1, 2]\n{"step": 1}\n')
    with pytest.raises(ValueError, match="line 2 must be a JSON object"):
        load_run(run)
    (run / "config.json").write_text("{nope")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load_run(run)


def test_load_run_skips_truncated_last_line(tmp_path):
    rows = make_rows()
    run = write_run(tmp_path / "r", rows=rows)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 200, "arm": "none", "se')  # an interrupted append
    with pytest.warns(UserWarning, match=rf"line {len(rows) + 1}, a partial last line"):
        _, loaded = load_run(run)
    assert loaded == rows
    # A complete file gives no warning.
    run2 = write_run(tmp_path / "s", rows=rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_run(run2)


# ---- plot_figure


def test_plot_curve():
    rows = make_rows()
    fig = plot_figure(FakeExperiment.figures[0], rows)
    (ax,) = fig.axes
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "test accuracy" and ax.get_title() == "Test accuracy"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(ARMS)
    # The line is the mean over seeds; the band spans the seeds' min..max.
    line = ax.get_lines()[0]
    final = [r["test_acc"] for r in rows if r["arm"] == "none" and r["step"] == STEPS[-1]]
    assert list(line.get_xdata()) == list(STEPS)
    assert line.get_ydata()[-1] == pytest.approx(sum(final) / 3)
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() <= min(final) + 1e-12 and band.max() >= max(final) - 1e-12


def test_plot_curve_skips_null_and_uses_log_scale():
    fig = plot_figure(FakeExperiment.figures[1], make_rows())
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    assert all(0 not in line.get_xdata() for line in ax.get_lines())  # train_loss is null at step 0
    assert len(ax.get_legend().get_texts()) == len(ARMS)


def test_arm_colours_are_consistent_across_figures():
    rows = make_rows()
    curve = plot_figure(FakeExperiment.figures[0], rows)
    panels = plot_figure(FakeExperiment.figures[2], rows)
    curve_colours = [line.get_color() for line in curve.axes[0].get_lines()]
    assert len(set(curve_colours)) == len(ARMS)
    assert [ax.get_lines()[0].get_color() for ax in panels.axes] == curve_colours


def test_plot_percentiles():
    rows = make_rows()
    fig = plot_figure(FakeExperiment.figures[2], rows)
    assert len(fig.axes) == len(ARMS)
    assert [ax.get_title() for ax in fig.axes] == [f"arm = {arm}" for arm in ARMS]
    assert all(ax.get_xlabel() == "step" for ax in fig.axes) and fig.axes[0].get_ylabel() == "input to sigmoid"
    assert fig.axes[0].get_shared_y_axes().joined(fig.axes[0], fig.axes[1])
    assert len(fig.axes[0].get_legend().get_texts()) == 3
    styles = {line.get_label(): line.get_linestyle() for line in fig.axes[1].get_lines()}
    assert styles == {"50th percentile": "-", "15th percentile": "--", "85th percentile": "--"}
    # Each percentile is averaged over seeds.
    p50 = next(line for line in fig.axes[1].get_lines() if line.get_label() == "50th percentile")
    expected = sum(r["probes"]["h1_p50"] for r in rows if r["arm"] == "batch" and r["step"] == 0) / len(SEEDS)
    assert p50.get_ydata()[0] == pytest.approx(expected)


def test_plot_figure_rejects_bad_specs():
    with pytest.raises(ValueError, match="unknown figure kind 'pie'"):
        plot_figure(FigureSpec(kind="pie", title="t", ylabel="y"), make_rows())
    with pytest.raises(ValueError, match="needs FigureSpec.metric"):
        plot_figure(FigureSpec(kind="curve", title="t", ylabel="y"), make_rows())


def test_plot_without_data_still_labels_axes():
    fig = plot_figure(FigureSpec(kind="curve", title="t", ylabel="y", metric="missing"), make_rows())
    assert fig.axes[0].get_xlabel() == "step" and fig.axes[0].get_legend() is None
    fig = plot_figure(FigureSpec(kind="percentiles", title="t", ylabel="y", probe="missing"), make_rows())
    assert len(fig.axes) == 1 and fig.axes[0].get_ylabel() == "y"


def test_log_grid_axis_is_ticked_at_the_grid_values():
    """Wu & He's batch sizes read 2, 8, 32 on the axis, not 2x10^0 and the like."""
    rows = [{"step": 10, "arm": arm, "seed": seed, "point": {"train.batch_size": b}, "test_acc": 0.9 - b / 1000}
            for arm in ("batch", "group") for seed in range(3) for b in (2, 8, 32)]
    spec = FigureSpec(kind="grid", title="t", ylabel="acc", metric="test_acc", axis="train.batch_size", logx=True)
    ax = plot_figure(spec, rows).axes[0]
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["2", "8", "32"]


def test_grid_figure_draws_declared_levels():
    rows = [{"step": 10, "arm": arm, "seed": seed, "point": {"params.scale": s}, "ratio": 1.05 + s / 100}
            for arm in ("a", "b") for seed in range(3) for s in (1, 4)]
    spec = FigureSpec(kind="grid", title="t", ylabel="r", metric="ratio", axis="params.scale",
                      levels=((1.1, "declared bound"),))
    ax = plot_figure(spec, rows).axes[0]
    assert [line.get_ydata()[0] for line in ax.lines if line.get_linestyle() == "--"] == [1.1]
    assert "declared bound" in [t.get_text() for t in ax.texts]
