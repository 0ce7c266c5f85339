"""The study report's extra views (issue #13) and single-epoch curves (issue #18 item 7), on one tiny 1-epoch
study of `digits`: per-step training loss/accuracy of every variation overlaid, an overfitting-onset column by the
diagnostics' own rule, the training time of each run; curves of a single epoch drawn as markers with their
values on integer epoch ticks; and the run report's gallery of training images per class."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

import cnnlab
from cnnlab.analysis.diagnose import overfitting_onset
from cnnlab.data.pipeline import prepare
from cnnlab.report import build as report
from cnnlab.report import plots
from cnnlab.report.sections import SECTIONS, figures_of
from cnnlab.rundir import RunDir, columns, load_run, read_csv
from cnnlab.studies import report as pages
from cnnlab.studies.compare import compare, load_groups

STUDY = {
    "data": {"name": "digits", "test_split": 0.2},
    "model": {"name": "layers", "layers": [{"conv": {"out": 4, "k": 3, "padding": 1}}, "relu", {"maxpool": 2},
                                           "flatten", {"linear": "classes"}]},
    "optim": {"name": "adam", "lr": 0.01},
    "train": {"epochs": 1, "progress": "off", "batch_size": 64, "log_every": 2, "threads": 1},
    "output": {"report": False, "name": "st"},
    "variations": {"main": {}, "slow": {"optim.lr": 0.002}},
}


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cnnlab.train({**STUDY, "output": {**STUDY["output"], "dir": str(out)}}, quiet=True)
    return out / "st"


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_per_step_curves_of_every_variation_on_one_plot(study_dir):
    groups, _, _ = load_groups([study_dir])
    fig = pages.fig_steps(groups)
    loss_ax, acc_ax = fig.axes[:2]
    for g, colour in zip(groups, ("C0", "C1")):
        logged = columns(read_csv(study_dir / g.name / "steps.csv"))
        assert len(logged["step"]) >= 5  # every train.log_every = 2 batches
        lines = [ln for ln in loss_ax.lines if ln.get_label() == g.name]
        assert len(lines) == 1
        np.testing.assert_array_equal(lines[0].get_xdata(), logged["step"])
        np.testing.assert_allclose(lines[0].get_ydata(), logged["loss"])
        assert any(np.allclose(ln.get_ydata(), 100 * np.asarray(logged["acc"])) for ln in acc_ax.lines)
    plots.plt.close(fig)
    html = (study_dir / "study.html").read_text()
    assert (study_dir / "plots" / "study_steps.png").is_file() and "at every logged step" in html
    assert "![Training loss per step](plots/study_steps.png)" in (study_dir / "study.md").read_text()


def test_onset_and_training_time_columns(study_dir, tmp_path):
    st = tmp_path / "st"
    shutil.copytree(study_dir, st)
    # main's history replaced by one that overfits (the shape of a real run: val loss turns up at epoch 5 while
    # training loss keeps falling); slow keeps its single epoch, where no onset can be seen
    e = np.arange(1, 13)
    tl, vl = 2.2 * np.exp(-e / 3) + 0.04, 0.3 + 1.9 * np.exp(-e / 2) + 0.02 * np.maximum(0, e - 5) ** 1.4
    with (st / "main" / "history.csv").open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"])
        for i in range(12):
            w.writerow([e[i], tl[i], 0.5, vl[i], 0.5, 0.01, 1.0])
    onset = overfitting_onset(load_run(st / "main").history_columns)
    assert onset is not None
    compare([st])
    comp = json.loads((st / "comparison.json").read_text())
    by = {g["name"]: g for g in comp["groups"]}
    assert by["main"]["overfit_onset"] == [onset["epoch"]] and by["slow"]["overfit_onset"] == [None]
    for name in ("main", "slow"):  # the time column is each run's recorded train_seconds
        assert by[name]["stats"]["train_seconds"]["mean"] == pytest.approx(RunDir(st / name).seconds)
    md = (st / "study.md").read_text()
    head = next(ln for ln in md.splitlines() if ln.startswith("| variation"))
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert cols.index("overfitting from") == cols.index("best epoch") + 1 and "train time" in cols
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip("|").split("|")] for ln in md.splitlines()
            if ln.startswith(("| main", "| slow"))}
    at = cols.index("overfitting from")
    assert rows["main"][at] == f"epoch {onset['epoch']}" and rows["slow"][at] == "not seen"
    assert rows["slow"][cols.index("train time")] == f"{RunDir(st / 'slow').seconds:.1f} s"
    html = (st / "study.html").read_text()
    assert f"epoch {onset['epoch']}" in html and "overfitting from" in html
    fig = pages.fig_curves(load_groups([st])[0], {"main": onset["epoch"]})
    assert [ln.get_xdata()[0] for ln in fig.axes[0].lines if ln.get_linestyle() == ":" and
            len(ln.get_xdata()) == 2] == [onset["epoch"]]  # the onset dotted on the loss curves
    plots.plt.close(fig)


def _single_epoch_axes_ok(ax) -> None:
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1"]
    lo, hi = ax.get_xlim()
    assert lo <= 0.5 and hi >= 1.5  # room around the point, not 0.945-1.055


def test_study_curves_of_one_epoch(study_dir):
    groups, _, _ = load_groups([study_dir])
    fig = pages.fig_curves(groups)
    for ax, what, fmt in ((fig.axes[0], "loss", "{:.3f}"), (fig.axes[1], "acc", "{:.1f}%")):
        _single_epoch_axes_ok(ax)
        drawn = [ln for ln in ax.lines if len(ln.get_xdata()) == 1]
        assert len(drawn) == 4 and all(ln.get_marker() not in (None, "None", "") for ln in drawn)  # train + val
        for g in groups:
            h = g.runs[0].history_columns
            for split in ("train", "val"):
                v = h[f"{split}_{what}"][0] * (100 if what == "acc" else 1)
                assert fmt.format(v) in _texts(ax)
    plots.plt.close(fig)


def test_run_curves_of_one_epoch(study_dir):
    h = RunDir(study_dir / "main").history_columns
    assert h["epoch"] == [1]
    fig = plots.curves(h, best_epoch=1)
    for ax in fig.axes[:2]:
        _single_epoch_axes_ok(ax)
    assert f"{h['train_loss'][0]:.3f}" in _texts(fig.axes[0]) and f"{h['val_loss'][0]:.3f}" in _texts(fig.axes[0])
    assert f"{100 * h['val_acc'][0]:.1f}%" in _texts(fig.axes[1])
    plots.plt.close(fig)
    many = plots.curves({k: v * 30 for k, v in h.items()} | {"epoch": list(range(1, 31))})
    ticks = many.axes[0].get_xticks()
    assert len(ticks) >= 3 and np.all(ticks == np.round(ticks))  # whole epochs beyond 20 too
    plots.plt.close(many)


def test_gallery_holds_real_training_pixels_and_is_a_report_section(study_dir, tmp_path):
    run = tmp_path / "main"
    shutil.copytree(study_dir / "main", run)
    rd = RunDir(run)
    images, labels, index = rd.gallery
    assert np.bincount(labels, minlength=10).tolist() == [6] * 10  # 6 per class, class by class
    assert list(labels) == sorted(labels)
    splits = prepare(rd.config.data, split_seed=rd.config.data.split_seed)
    np.testing.assert_array_equal(images, splits.train.images[index].numpy())  # raw uint8, as decoded
    np.testing.assert_array_equal(labels, splits.train.labels[index])
    assert "data_gallery" in [f.key for f in figures_of(SECTIONS)]
    page = report.build(run, sections=[s for s in SECTIONS if s.id == "gallery"]).read_text()  # that section only
    assert 'id="gallery"' in page and (run / "plots" / "data_gallery.png").is_file()
    assert "6 training images of each class" in page


def test_tensorboard_has_the_step_accuracy_beside_the_loss(study_dir, tmp_path):
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run = study_dir / "main"
    logged = columns(read_csv(run / "steps.csv"))
    for log_dir in (run / "tensorboard", report.write_tensorboard(run, tmp_path / "tb")):  # live, then replayed
        ea = ea_mod.EventAccumulator(str(log_dir))
        ea.Reload()
        acc = ea.Scalars("step/acc")
        assert [e.step for e in acc] == logged["step"]
        np.testing.assert_allclose([e.value for e in acc], logged["acc"], atol=1e-4)
