"""Temperature scaling: fitted on the validation split (train.calibrate, `cnnlab calibrate RUN`), ECE before
and after in metrics.json, the temperature applied by `cnnlab.load`, the reliability diagrams in the report."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

import cnnlab
from cnnlab import cli
from cnnlab.analysis import calibration as cal
from cnnlab.analysis import metrics as M

CFG = {
    "data": {"name": "digits", "val_split": 0.2, "test_split": 0.2},
    "model": {"name": "layers", "layers": [{"conv": {"out": 8, "k": 3, "padding": 1}}, "relu", {"maxpool": 2},
                                           "flatten", {"linear": "classes"}]},
    "optim": {"name": "adam", "lr": 0.02},
    "train": {"epochs": 2, "batch_size": 64, "seed": 1, "progress": "off", "threads": 1},
    "output": {"report": False},
}


def test_temperature_scaling_lowers_the_ece_of_an_over_confident_model():
    """Labels drawn from softmax(z), the model reporting 3z: over-confident. The temperature fitted on one half
    is about 3, and on the other half the ECE and the NLL fall; the predicted classes do not change."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, (6000, 5))
    p = M.softmax(z)
    y = (rng.random((6000, 1)) > p.cumsum(1)).sum(1)
    logits = 3 * z
    t = cal.fit_temperature(logits[:3000], y[:3000])
    assert 2.6 < t < 3.4, t
    r = cal.report(logits[3000:], y[3000:], t)
    assert r["ece_before"] > 0.1 and r["ece_after"] < r["ece_before"] / 3, r
    assert r["nll_after"] < r["nll_before"]
    assert (cal.scaled(logits, t).argmax(1) == logits.argmax(1)).all()
    assert cal.fit_temperature(np.zeros((0, 5)), np.zeros(0, np.int64)) == 1.0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cal")
    n = torch.get_num_threads()
    try:
        out = {}
        for name, over in (("on", ["train.calibrate=true"]), ("off", [])):
            cfg = folder / f"{name}.yaml"
            cfg.write_text(yaml.safe_dump({**CFG, "output": {**CFG["output"], "dir": str(folder), "name": name}}))
            assert cli.main(["train", str(cfg), *over]) == 0
            out[name] = folder / name
        return out
    finally:
        torch.set_num_threads(n)


def test_train_calibrate_records_the_temperature_and_both_eces(runs):
    run = runs["on"]
    m = json.loads((run / "metrics.json").read_text())
    c, saved = m["calibration"], json.loads((run / "calibration.json").read_text())
    assert c["temperature"] == saved["temperature"] and c["fitted_on"] == "val" and c["split"] == "test"
    assert c["ece_before"] == pytest.approx(m["test"]["ece"])  # the raw ECE, as before
    z = np.load(run / "predictions.npz")
    t = c["temperature"]
    assert c["ece_after"] == pytest.approx(M.expected_calibration_error(z["logits"] / t, z["targets"]))
    assert saved["val"]["nll_after"] <= saved["val"]["nll_before"] + 1e-9  # the fit's own objective
    assert t != 1.0 and c["nll_after"] == pytest.approx(M.cross_entropy(z["logits"] / t, z["targets"]))
    # the report's calibration section (drawn alone here: the whole report is test_report's): both diagrams
    from cnnlab.report import build, sections

    page = build.build(run, sections=[s for s in sections.SECTIONS if s.id == "calibration"]).read_text()
    assert 'id="calibration"' in page and "Temperature scaling" in page and f"{t:.4f}" in page
    for name in ("reliability", "reliability_calibrated"):
        assert (run / "plots" / f"{name}.png").stat().st_size > 1000


def test_load_and_predict_apply_the_temperature(runs, tmp_path):
    run = runs["on"]
    t = json.loads((run / "calibration.json").read_text())["temperature"]
    clf = cnnlab.load(run)
    images = np.load(run / "samples.npz")["images"][:6]
    logits = clf.logits(torch.from_numpy(images))
    probs = clf.predict_proba(list(images[:, 0]))  # (8, 8) grey images
    assert np.allclose(probs, (logits / t).softmax(1).numpy(), atol=1e-6)
    assert not np.allclose(probs, logits.softmax(1).numpy(), atol=1e-3)
    assert cnnlab.load(runs["off"]).run.temperature == 1.0
    # an exported model says which temperature its logits want
    path = cnnlab.export(run, format="torchscript", out=tmp_path / "m.pt", quiet=True)
    assert json.loads(path.with_name(path.name + ".json").read_text())["temperature"] == t


def test_cnnlab_calibrate_fits_a_finished_run_later(runs, capsys):
    run = runs["off"]
    before = json.loads((run / "metrics.json").read_text())
    assert "calibration" not in before and not (run / "calibration.json").exists()
    assert cli.main(["calibrate", str(run), "--no-report"]) == 0
    assert "temperature" in capsys.readouterr().out
    after = json.loads((run / "metrics.json").read_text())
    # the same seed and data as the "on" run: the same weights, so the same temperature
    on = json.loads((runs["on"] / "metrics.json").read_text())["calibration"]
    assert after["calibration"]["temperature"] == pytest.approx(on["temperature"], rel=1e-5)
    assert {k: v for k, v in after.items() if k != "calibration"} == before  # nothing else changed
    assert cli.main(["calibrate", str(run.parent / "nothing")]) == 2
