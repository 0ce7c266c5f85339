"""report.build on a run folder in the trainer's exact format: every section, a page that renders in
headless Chromium with every image loaded, tolerance of missing files, and identical rebuilds without training.
"""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnlab import config

from cnnlab.analysis import metrics

from cnnlab.report import plots

from cnnlab.report import plots_model

from cnnlab.report import build as report
from cnnlab.models import build_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
LAYERS = [{"conv": {"out": 8, "k": 3, "padding": 1}}, "relu", {"maxpool": 2},
          {"conv": {"out": 16, "k": 3, "padding": 1}}, "relu", "flatten", {"linear": 32}, "relu", {"linear": "classes"}]


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.clip(np.round(d.images * (255 / 16)), 0, 255).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    perm = np.random.default_rng(0).permutation(len(imgs))
    tr, va, te = perm[:1200], perm[1200:1437], perm[1437:]
    return imgs, d.target.astype(np.int64), {"train": tr, "val": va, "test": te}


def make_run(root: Path, name: str = "toy", *, shift: tuple[int, int] | None = None, steps_train: int = 40,
             duplicates: int = 0, seed: int = 0) -> Path:
    """A run folder exactly as the trainer writes it: a real tiny model trained on sklearn digits (labels of
    class shift[0] replaced by shift[1] in training when `shift` is set), its real predictions on the test
    split, and a synthetic 12-epoch history with overfitting from epoch 5."""
    torch.manual_seed(seed)
    imgs, labels, split = _digits()
    classes = [str(i) for i in range(10)]
    cfg = config.load({"data": {"name": "digits"}, "model": {"name": "layers", "layers": LAYERS},
                       "train": {"epochs": 12, "seed": seed, "log_every": 10}, "output": {"name": name}})
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(config.dump_yaml(cfg))
    x_all = torch.from_numpy(imgs).float() / 255.0
    mean, std = float(x_all[split["train"]].mean()), float(x_all[split["train"]].std())
    norm = (x_all - mean) / std
    y_train = labels[split["train"]].copy()
    if shift:
        y_train[y_train == shift[0]] = shift[1]
    model = build_model(cfg.model, num_classes=10, in_channels=1, input_size=8)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    xt, yt = norm[split["train"]], torch.from_numpy(y_train)
    for _ in range(steps_train):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    model.eval()
    torch.save({"model": model.state_dict(), "epoch": 5}, run / "checkpoints" / "best.pt")

    te = split["test"]
    with torch.no_grad():
        logits = model(norm[te]).numpy().astype(np.float32)
    targets = labels[te]
    np.savez(run / "predictions.npz", logits=logits, targets=targets)
    prob = metrics.softmax(logits)
    pred = prob.argmax(1)
    loss = -np.log(np.clip(prob[np.arange(len(te)), targets], 1e-45, None))
    with (run / "predictions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "id", "target", "target_name", "pred", "pred_name", "confidence", "loss"])
        for i in range(len(te)):
            w.writerow([i, f"digits/{te[i]}", targets[i], classes[targets[i]], pred[i], classes[pred[i]],
                        f"{prob[i, pred[i]]:.6f}", f"{loss[i]:.6f}"])
    rng = np.random.default_rng(seed)
    pick = list(rng.choice(len(te), 16, replace=False))
    wrong = [int(i) for i in np.argsort(-loss) if pred[i] != targets[i] and i not in pick][:12]
    idx = np.array(pick + wrong, dtype=np.int64)
    np.savez(run / "samples.npz", images=imgs[te][idx], index=idx)
    tr = split["train"]
    gidx = np.concatenate([np.flatnonzero(labels[tr] == c)[:6] for c in range(10)]).astype(np.int64)
    np.savez(run / "gallery.npz", images=imgs[tr][gidx], labels=labels[tr][gidx], index=gidx)

    e = np.arange(1, 13)
    tl = 2.2 * np.exp(-e / 3) + 0.04
    vl = 0.3 + 1.9 * np.exp(-e / 2) + 0.02 * np.maximum(0, e - 5) ** 1.4 + np.random.default_rng(1).normal(0, 0.004, 12)
    ta, va = 1 - 0.9 * np.exp(-e / 2.5), 0.93 - 0.8 * np.exp(-e / 1.6) - 0.003 * np.maximum(0, e - 6)
    with (run / "history.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"])
        for i in range(12):
            w.writerow([e[i], tl[i], ta[i], vl[i], va[i], 0.01 * 0.5 * (1 + np.cos(np.pi * i / 12)), 1.5])
    with (run / "steps.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "loss", "lr"])
        for s in range(0, 120, 10):
            ep = s // 10 + 1
            w.writerow([s, ep, tl[ep - 1] * (1 + 0.1 * np.sin(s)), 0.01])
    counts = {k: {c: int((labels[v] == i).sum()) for i, c in enumerate(classes)} for k, v in split.items()}
    findings = [{"severity": "warning", "kind": "duplicate_across_splits", "path": f"digits/{i}",
                 "message": f"digits/{i} (train) equals digits/{1437 + i} (test)"} for i in range(duplicates)]
    (run / "data.json").write_text(json.dumps({
        "name": "digits", "classes": classes, "num_classes": 10, "in_channels": 1, "input_size": 8,
        "mean": [mean], "std": [std], "counts": counts, "sizes": {k: len(v) for k, v in split.items()},
        "eval_split": "test", "findings": findings}))
    n_params = sum(p.numel() for p in model.parameters())
    (run / "model.json").write_text(json.dumps({"name": "layers", "total_params": n_params,
                                                "trainable_params": n_params, "summary_text": str(model)}))
    (run / "env.json").write_text(json.dumps({
        "python": sys.version.split()[0], "torch": torch.__version__, "torchvision": "0", "numpy": np.__version__,
        "platform": sys.platform, "device": "cpu", "seed": seed, "git_commit": None, "cnnlab": "0.1.0",
        "started": "2025-01-01T12:00:00", "argv": ["cnnlab", "train", "toy.yaml"]}))
    (run / "metrics.json").write_text(json.dumps({
        "best_epoch": 6, "monitor": "val_acc", "best_val_acc": float(va.max()), "best_val_loss": float(vl.min()),
        "epochs_run": 12, "stopped_early": False, "seconds": 18.0, "eval_split": "test",
        "test": metrics.summary(logits, targets, classes)}))
    return run


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    run = make_run(root, duplicates=2)
    return run, report.build(run)


def test_report_has_every_section(built):
    run, path = built
    page = path.read_text()
    for sid in ("diagnostics", "curves", "confusion", "classes", "failures", "predictions", "inside", "gallery",
                "data", "model", "config", "environment"):
        assert f'id="{sid}"' in page, sid
    for name in ("curves", "steps", "confusion_matrix", "confusion_normalized", "per_class", "reliability",
                 "failures", "predictions", "filters", "feature_maps", "gradcam", "data_gallery"):
        assert (run / "plots" / f"{name}.png").stat().st_size > 1000, name
    # self-contained: no external references of any kind, no scripts
    assert not re.search(r'(src|href)="(?!data:|#)', page)
    assert "<script" not in page and "url(http" not in page
    # failures.csv lists every misclassified sample
    preds = report.read_csv(run / "predictions.csv")
    fails = report.read_csv(run / "failures.csv")
    assert len(fails) == sum(r["target"] != r["pred"] for r in preds) > 0
    assert [r["loss"] for r in fails] == sorted((r["loss"] for r in fails), reverse=True)
    md = (run / "report.md").read_text()
    assert "](plots/confusion_matrix.png)" in md and "## Diagnostics" in md
    # the diagnostics: overfitting onset at the validation-loss minimum, duplicates from data.json
    found = json.loads((run / "findings.json").read_text())
    kinds = {f["kind"]: f for f in found}
    hist = report.columns(report.read_csv(run / "history.csv"))
    vmin = int(np.argmin(hist["val_loss"])) + 1
    assert abs(kinds["overfitting"]["data"]["epoch"] - vmin) <= 1
    assert "duplicates" in kinds
    assert f"overfitting from epoch {kinds['overfitting']['data']['epoch']}" in page.lower()


def _chromium(args: list[str], timeout: int = 60) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="cnnlab-chromium-")
    try:
        return subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


# Injected into a copy of the page (the report itself has no script): records errors of every kind,
# including images that fail to load (error events captured at the window), then writes the result.
PROBE = """<script>
window.__errs = [];
addEventListener('error', function (e) { __errs.push(e.message || ('load failed: ' + (e.target && e.target.tagName))); }, true);
addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).map(function (i) { return i.alt; });
  var pre = document.createElement('pre'); pre.id = '__probe';
  pre.textContent = JSON.stringify({images: imgs.length, bad: bad, errors: __errs});
  document.body.appendChild(pre);
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")
def test_renders_in_chromium(built, tmp_path):
    run, path = built
    page = path.read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("<head>", "<head>" + PROBE, 1))
    res = _chromium(["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()])
    m = re.search(r'<pre id="__probe">(.*?)</pre>', res.stdout)
    assert m, f"probe did not run: {res.stderr[-2000:]}"
    out = json.loads(m.group(1).replace("&quot;", '"'))
    assert out["images"] == page.count("<img ") >= 10
    assert out["bad"] == [] and out["errors"] == []
    # the real page: a screenshot, and no console messages of level error or warning
    shot = tmp_path / "report.png"
    res = _chromium(["--enable-logging=stderr", "--v=0", "--hide-scrollbars", "--window-size=1400,2400",
                     f"--screenshot={shot}", path.as_uri()])
    assert shot.is_file() and shot.stat().st_size > 20000, res.stderr[-2000:]
    console = [ln for ln in res.stderr.splitlines() if "CONSOLE" in ln]
    assert console == [], console


def test_rebuild_is_identical_and_never_trains(built, monkeypatch, capsys):
    """`cnnlab report RUN_DIR` (through the command's parser and handler) redraws the same report, without training."""
    from cnnlab import cli

    run, path = built
    before = {p: (run / p).read_bytes() for p in ("report.html", "report.md", "findings.json", "failures.csv")}
    ckpt = (run / "checkpoints" / "best.pt").read_bytes()

    def no_training(*a, **k):
        raise AssertionError("the report must not train")

    monkeypatch.setattr(torch.optim.Optimizer, "step", no_training)
    assert cli.main(["report", str(run)]) == 0 and str(path) in capsys.readouterr().out
    for p, data in before.items():
        assert (run / p).read_bytes() == data, p
    assert (run / "checkpoints" / "best.pt").read_bytes() == ckpt
    assert cli.main(["report", str(run.parent / "missing")]) == 2 and "does not exist" in capsys.readouterr().err


def test_a_new_section_is_one_declaration(built, tmp_path):
    """A toy section with its own figure and table: one Section(...) added to the list; build draws its figure
    into plots/, and both report.html and report.md show it, after the sections before it."""
    from cnnlab.report import sections as S
    from cnnlab.report.figures import Drawn

    def draw_toy(d):
        fig = plots.plt.figure(figsize=(2, 2))
        fig.gca().plot(d.run["history"]["val_loss"])
        return Drawn(fig, f"{len(d.run['history']['val_loss'])} epochs of validation loss.")

    toy = S.Section("toy", "Toy section", "A lead with `code` in it.", (
        S.Figures((S.Figure("toy_curve", "Toy curve", draw_toy),)),
        lambda ctx: S.Table(["class", "accuracy"], [[r["name"], S.Bar(r["accuracy"])]
                                                    for r in ctx["run"]["summary"]["per_class"]])))
    run = tmp_path / "toy"
    shutil.copytree(built[0], run)
    page = report.build(run, sections=[*S.SECTIONS, toy]).read_text()
    assert (run / "plots" / "toy_curve.png").stat().st_size > 1000
    assert page.index('id="environment"') < page.index('id="toy"') and '<a href="#toy">Toy section</a>' in page
    assert "A lead with <code>code</code> in it." in page and "12 epochs of validation loss." in page
    md = (run / "report.md").read_text()
    assert md.index("## Environment") < md.index("## Toy section") and "](plots/toy_curve.png)" in md
    assert "| class | accuracy |" in md
    report.build(run)  # the default sections again: no toy section on the page
    assert 'id="toy"' not in (run / "report.html").read_text() and "## Toy" not in (run / "report.md").read_text()


def test_planted_label_bug_is_named(tmp_path):
    run = make_run(tmp_path, "shifted", shift=(3, 4))
    page = report.build(run).read_text()
    found = json.loads((run / "findings.json").read_text())
    dead = [f for f in found if f["kind"] == "dead_class"]
    assert [f["data"]["class"] for f in dead] == ["3"]
    assert dead[0]["severity"] == "error" and found[0]["kind"] == "dead_class"
    assert "Class &#x27;3&#x27; is never predicted" in page
    assert "label-mapping bug" in (run / "report.md").read_text()


def test_missing_optional_files(built, tmp_path):
    run = tmp_path / "bare"
    shutil.copytree(built[0], run)
    for p in ("samples.npz", "steps.csv", "model.json", "env.json", "predictions.csv", "gallery.npz"):
        (run / p).unlink()
    shutil.rmtree(run / "checkpoints")
    page = report.build(run).read_text()
    for sid in ("failures", "diagnostics", "confusion", "classes"):
        assert f'id="{sid}"' in page, sid
    for sid in ("predictions", "inside", "model", "environment", "gallery"):
        assert f'id="{sid}"' not in page, sid
    for name in ("gradcam", "filters", "predictions", "steps", "data_gallery"):  # stale figures of the earlier build are gone
        assert not (run / "plots" / f"{name}.png").exists(), name
    assert "Model figures omitted: no checkpoints/best.pt" in page
    # metrics.json and predictions.npz gone too: curves and data still make a report
    (run / "metrics.json").unlink()
    (run / "predictions.npz").unlink()
    page = report.build(run).read_text()
    assert 'id="curves"' in page and 'id="data"' in page and 'id="confusion"' not in page


def test_confusion_matrix_scales_to_100_classes():
    rng = np.random.default_rng(0)
    sizes = []
    for k in (2, 10, 100):
        y = rng.integers(0, k, 20 * k)
        cm = metrics.confusion_matrix(y, np.where(rng.random(len(y)) < 0.7, y, rng.integers(0, k, len(y))), k)
        for norm in (False, True):
            fig = plots.confusion(cm, [f"class_{i}" for i in range(k)], normalize=norm)
            sizes.append(fig.get_size_inches()[1])
            texts = len(fig.axes[0].texts)
            plots.plt.close(fig)
            assert texts == (0 if k == 100 else np.count_nonzero(cm)) or norm
    assert sizes[0] < sizes[2] < sizes[4]


def test_gradcam_layer_choice_and_range():
    cfg = config.load({"model": {"name": "layers", "layers": [
        {"conv": {"out": 4, "k": 3, "padding": 1}}, "relu", {"maxpool": 2},
        {"conv": {"out": 6, "k": 3, "padding": 1}}, "relu", {"maxpool": 4},
        {"conv": {"out": 5, "k": 1}}, "relu", {"linear": "classes"}]}})
    model = build_model(cfg.model, num_classes=3, in_channels=1, input_size=8).eval()
    x = torch.randn(4, 1, 8, 8)
    name, layer = plots_model.cam_layer(model, x[:1])
    assert layer is model[3]  # the 1x1 output conv (index 6) is skipped
    maps, logits = plots_model.gradcam(model, x, layer)
    assert maps.shape == (4, 8, 8) and maps.min() >= 0 and maps.max() <= 1 + 1e-6
    assert torch.allclose(logits, model(x), atol=1e-6)  # the hook's clone changes nothing


def test_tensorboard(built, tmp_path, monkeypatch):
    run, _ = built
    out = report.write_tensorboard(run, tmp_path / "tb")
    assert out is not None and any(p.name.startswith("events.out.tfevents") for p in out.iterdir())
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails: a silent no-op
    tb = report.TBLogger(tmp_path / "tb2")
    tb.scalar("x", 1.0, 0)
    tb.close()
    assert not tb.enabled and not (tmp_path / "tb2").exists()


def _has_trainer() -> bool:
    import cnnlab

    return hasattr(cnnlab, "train") and Path("examples/quickstart.yaml").is_file()


@pytest.mark.skipif(not _has_trainer(), reason="cnnlab.train or examples/quickstart.yaml not there yet")
def test_real_run(tmp_path):
    import cnnlab

    run = cnnlab.train("examples/quickstart.yaml", ["train.epochs=3", f"output.dir={tmp_path}"])
    d = Path(run.dir)
    if not (d / "report.html").is_file():  # the trainer writes it unless output.report is false
        report.build(d)
    page = (d / "report.html").read_text()
    for sid in ("diagnostics", "curves", "confusion", "classes", "predictions", "inside", "config", "environment"):
        assert f'id="{sid}"' in page, sid
    found = (d / "findings.json").read_text()
    saved = json.loads((d / "metrics.json").read_text())["test"]
    z = np.load(d / "predictions.npz")
    again = metrics.summary(z["logits"], z["targets"], [r["name"] for r in saved["per_class"]])
    assert again["confusion"] == saved["confusion"] and abs(again["accuracy"] - saved["accuracy"]) < 1e-12
    report.build(d)  # from the saved files alone: the same findings and tables
    assert (d / "findings.json").read_text() == found
    def text(html):  # pixels of Grad-CAM may differ in the last bit between processes; the words may not
        return re.sub(r"data:image/png;base64,[^\"]+", "", html)

    assert text((d / "report.html").read_text()) == text(page)


@pytest.mark.skipif(not _has_trainer(), reason="cnnlab.train or examples/quickstart.yaml not there yet")
def test_real_run_made_to_overfit(tmp_path):
    """60 training images, no dropout, batch norm, augmentation or weight decay, 30 epochs: validation loss
    bottoms out and climbs while training loss goes to ~0. The onset found must be within one epoch of the
    validation-loss minimum."""
    import cnnlab

    run = cnnlab.train("examples/quickstart.yaml", [
        "model.layers=[{conv: {out: 32, k: 3, padding: 1}}, relu, {conv: {out: 64, k: 3, padding: 1}}, relu, "
        "{maxpool: 2}, {linear: 128}, relu, {linear: classes}]", "train.epochs=30", f"output.dir={tmp_path}", "output.name=overfit", "data.limit_train=60",
        "data.augment.crop_padding=0", "optim.weight_decay=0", "schedule.name=none", "train.batch_size=20",
        "output.report=false", "train.progress=off"])
    report.build(run.dir)
    hist = report.columns(report.read_csv(Path(run.dir) / "history.csv"))
    found = json.loads((Path(run.dir) / "findings.json").read_text())
    onset = [f for f in found if f["kind"] == "overfitting"]
    assert onset, f"no overfitting found in val_loss {np.round(hist['val_loss'], 3).tolist()}"
    assert abs(onset[0]["data"]["epoch"] - (int(np.argmin(hist["val_loss"])) + 1)) <= 1
    assert f"overfitting from epoch {onset[0]['data']['epoch']}" in (Path(run.dir) / "report.html").read_text().lower()
