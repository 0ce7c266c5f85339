"""The learning-rate range test (training/lrfind.py): `cnnlab lr-find` writes its plot and curve and nothing
else and prints the override that uses its suggestion; the suggestion is a tenth of the smoothed minimum; a
diverging loss ends the test; `optim.lr: auto` trains with the suggestion and records it in config.yaml and
the report. Digits and a one-conv net: a few seconds each."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

import cnnlab
from cnnlab import cli
from cnnlab import config as C
from cnnlab import rundir as R
from cnnlab.training import lrfind

TINY = {
    "data": {"name": "digits", "test_split": 0.2},
    "model": {"name": "layers", "layers": [{"conv": {"out": 4, "k": 3, "padding": 1}}, "relu", {"maxpool": 2},
                                           "flatten", {"linear": "classes"}]},
    "optim": {"name": "adam", "lr": 0.01},
    "train": {"epochs": 1, "progress": "off", "batch_size": 64, "threads": 1},
    "output": {"report": False},
}


def tiny(out: Path, **optim) -> dict:
    tree = json.loads(json.dumps(TINY))
    tree["output"]["dir"] = str(out)
    tree["optim"].update(optim)
    return tree


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_lr_find_writes_only_its_plot_and_curve_and_prints_the_override(tmp_path, capsys):
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny(tmp_path / "runs")))
    assert cli.main(["lr-find", str(path), "--steps", "60", "--start-lr", "1e-6", "--end-lr", "1"]) == 0
    out = capsys.readouterr().out
    assert files_under(tmp_path / "runs") == {"tiny-lr-find/lr_find.png", "tiny-lr-find/lr_find.csv"}
    assert files_under(tmp_path / "cfg") == {"tiny.yaml"}  # nothing beside the config, no run folder
    rows = R.read_csv(tmp_path / "runs" / "tiny-lr-find" / "lr_find.csv")
    lrs = np.array([r["lr"] for r in rows])
    assert len(rows) == 60 and lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(lrs[1:] / lrs[:-1], (1 / 1e-6) ** (1 / 59), rtol=1e-4)  # exponential
    again = lrfind.read_curve(tmp_path / "runs" / "tiny-lr-find" / "lr_find.csv")  # from the saved losses
    s = float(re.search(r"optim\.lr=(\S+)", out).group(1))
    assert s == again.suggestion and s == pytest.approx(again.lr_min / 10, rel=0.05)
    assert 1e-6 < s < 1 and f"cnnlab train {path} optim.lr={s:g}" in out
    assert [r["smoothed"] for r in rows] == pytest.approx(lrfind.smooth([r["loss"] for r in rows]), rel=1e-4)


def test_a_diverging_loss_ends_the_test_before_its_last_step(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny(tmp_path / "runs", name="sgd", momentum=0.9)))
    out_dir = tmp_path / "here"
    assert cli.main(["lr-find", str(path), "--steps", "100", "--start-lr", "1e-4", "--end-lr", "1e4",
                     "--out", str(out_dir)]) == 0
    rows = R.read_csv(out_dir / "lr_find.csv")
    assert 10 < len(rows) < 100  # stopped well before lr 1e4
    last = rows[-1]["smoothed"]
    assert not math.isfinite(last) or last > 4 * min(r["smoothed"] for r in rows) or \
        "non-finite" in capsys.readouterr().out
    assert files_under(tmp_path) == {"tiny.yaml", "here/lr_find.png", "here/lr_find.csv"}


def test_the_suggestion_is_a_tenth_of_the_smoothed_minimum():
    lrs = lrfind.schedule(1e-5, 10.0, 100)
    x = np.log10(lrs)
    loss = np.where(x < -1, 2.3 - 0.5 * np.clip(x + 3, 0, None), 1.3 + 6 * (x + 1) ** 2)  # falls, then climbs
    found = lrfind.suggest(lrfind.LRFind(lrs=lrs, losses=loss.tolist()))
    i = int(np.argmin(lrfind.smooth(loss.tolist())))
    assert found.lr_min == lrs[i] and 0.1 <= found.lr_min < 1  # the smoothing lags the raw minimum at 0.1
    assert found.suggestion == float(f"{lrs[i] / 10:.2g}")
    assert 1e-3 <= found.steepest <= found.lr_min  # on the falling stretch
    assert lrfind.diverged([2.0, 1.0, 4.5]) and not lrfind.diverged([2.0, 1.0, 3.9])
    assert lrfind.diverged([2.0, float("nan")])


def test_optim_lr_auto_trains_with_the_suggestion_and_records_it(tmp_path):
    from cnnlab.report import build
    from cnnlab.report import sections as S

    run = cnnlab.train(tiny(tmp_path, lr="auto") | {"output": {"dir": str(tmp_path), "name": "auto",
                                                              "report": False}}, quiet=True)
    found = json.loads((run.dir / "lr_find.json").read_text())
    chosen = found["suggestion"]
    assert 0 < chosen < 10 and found["method"] == "lr_min / 10"
    assert C.load(run.dir / "config.yaml").optim.lr == chosen  # config.yaml re-runs the same rate
    assert re.search(rf"^  lr: {chosen}  # optim.lr: auto", (run.dir / "config.yaml").read_text(), re.M)
    assert [r["lr"] for r in R.read_csv(run.dir / "history.csv")] == [pytest.approx(chosen)]  # trained with it
    assert len(R.read_csv(run.dir / "lr_find.csv")) == found["steps"]
    sections = [s for s in S.SECTIONS if s.id in ("lr_find", "config")]
    build.build(run.dir, sections=sections)
    md = (run.dir / "report.md").read_text()
    assert f"chose {chosen:g}" in md and "![Learning-rate range test](plots/lr_find.png)" in md
    assert (run.dir / "plots" / "lr_find.png").is_file()


def test_optim_lr_takes_a_number_or_auto_only():
    assert C.load(None, ["optim.lr=auto"]).optim.lr == "auto"
    with pytest.raises(C.ConfigError, match=r"optim\.lr.*'auto'"):
        C.load(None, ["optim.lr=autoo"])
    with pytest.raises(C.ConfigError, match=r"optim\.lr=-0\.1"):
        C.load(None, ["optim.lr=-0.1"])
