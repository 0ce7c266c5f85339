"""Studies end to end on `digits` with a tiny model: planning, folders and manifest, resuming after a SIGKILL,
parallel subprocesses, Ray, the report's statistics and `cnnlab compare`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import cnnlab
from cnnlab import cli
from cnnlab import config as C
from cnnlab.analysis import stats as S
from cnnlab.studies import study
from cnnlab.rundir import load_run
from cnnlab.studies.compare import correct_by_id

TINY = {
    "data": {"name": "digits", "test_split": 0.2},
    "model": {"name": "layers", "layers": [{"conv": {"out": 4, "k": 3, "padding": 1}}, "relu", {"maxpool": 2},
                                           "flatten", {"linear": "classes"}]},
    "optim": {"name": "adam", "lr": 0.01},
    "train": {"epochs": 1, "progress": "off", "batch_size": 128},
    "output": {"report": False},
}


def tiny(tmp_path: Path, name: str = "st", **extra) -> dict:
    tree = json.loads(json.dumps(TINY))
    tree["output"].update(dir=str(tmp_path), name=name)
    tree.update(extra)
    return tree


def mtimes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in folder.rglob("*") if p.is_file()}


def numbers(study_dir: Path) -> tuple[dict, dict]:
    """study.json and comparison.json without paths and wall times: what must not depend on interruptions."""
    man = json.loads((study_dir / "study.json").read_text())
    man.pop("source"), man.pop("name")
    for v in man["variations"]:
        v["config"].pop("output")
    comp = json.loads((study_dir / "comparison.json").read_text())
    for g in comp["groups"]:
        g.pop("dirs")
        g["stats"].pop("train_seconds")
    return man, comp


# ---- planning


def test_plan_variations_grid_repeats(tmp_path):
    cfg = C.load(tiny(tmp_path, variations={"main": {}, "l2": {"optim.weight_decay": "1e-5"},
                                            "bn": {"model": {"options": {}}, "train": {"label_smoothing": 0.1}}},
                      grid={"optim.lr": [0.01, 0.1]}, repeats=2))
    runs = study.plan(cfg)
    assert len(runs) == 3 * 2 * 2
    assert [r.id for r in runs[:4]] == ["main+lr=0.01/seed-0", "main+lr=0.01/seed-1", "main+lr=0.1/seed-0",
                                        "main+lr=0.1/seed-1"]
    l2 = next(r for r in runs if r.variation == "l2+lr=0.1" and r.seed == 1)
    assert l2.cfg.optim.weight_decay == 1e-5  # the text "1e-5" (PyYAML reads 1e-5 without a dot as text)
    assert l2.cfg.optim.lr == 0.1 and l2.cfg.train.seed == 1
    assert Path(l2.cfg.output.dir) == tmp_path / "st" / "l2+lr=0.1" and l2.cfg.output.name == "seed-1"
    bn = next(r for r in runs if r.variation.startswith("bn"))
    assert bn.overrides == {"model.options": {}, "train.label_smoothing": 0.1, "optim.lr": 0.01}
    assert not bn.cfg.variations and bn.cfg.repeats == 1
    only_grid = study.plan(C.load(tiny(tmp_path, grid={"optim.lr": [0.01, 1e-3], "train.batch_size": [64]})))
    assert [r.id for r in only_grid] == ["lr=0.01+batch_size=64", "lr=0.001+batch_size=64"]
    assert only_grid[1].overrides == {"optim.lr": 1e-3, "train.batch_size": 64}
    assert study.plan(C.load(tiny(tmp_path, repeats=3)))[2].id == "main/seed-2"


def test_plan_errors_name_the_variation(tmp_path):
    with pytest.raises(C.ConfigError, match=r"variation 'bad'.*optim.lr"):
        study.plan(C.load(tiny(tmp_path, variations={"main": {}, "bad": {"optim.lr": -1}})))
    with pytest.raises(C.ConfigError, match="unknown key 'optim.lrr'"):
        study.plan(C.load(tiny(tmp_path, variations={"typo": {"optim.lrr": 1}})))
    with pytest.raises(C.ConfigError, match="output.dir cannot differ"):
        study.plan(C.load(tiny(tmp_path, variations={"x": {"output.dir": "elsewhere"}})))
    with pytest.raises(C.ConfigError, match="Did you mean 'batchnorm'"):
        study.run_study(C.load(tiny(tmp_path, variations={"main": {}, "batchnorm": {}}, baseline="batchnrm")))


# ---- running


def test_study_with_repeats_inline_and_rerun_keeps_finished_runs(tmp_path):
    st = cnnlab.train(tiny(tmp_path, variations={"main": {}, "fast": {"optim.lr": 0.03}}, repeats=2), quiet=True)
    root = tmp_path / "st"
    assert st.dir == root and set(st.status.values()) == {"done"}
    for rid in ("main/seed-0", "main/seed-1", "fast/seed-0", "fast/seed-1"):
        assert (root / rid / "metrics.json").is_file()
    assert C.load(root / "fast/seed-1/config.yaml").train.seed == 1
    man = json.loads((root / "study.json").read_text())
    assert man["complete"] and man["baseline"] == "main" and man["seeds"] == [0, 1]
    assert man["variations"][1]["overrides"] == {"optim.lr": 0.03}
    assert man["variations"][1]["config"]["optim"]["lr"] == 0.03
    comp = json.loads((root / "comparison.json").read_text())
    (c,) = comp["comparisons"]
    accs = {g: [json.loads((root / g / f"seed-{s}/metrics.json").read_text())["test"]["accuracy"] for s in (0, 1)]
            for g in ("main", "fast")}
    t, p = S.paired_t(accs["fast"], accs["main"])
    assert c["test"] == "paired_t" and c["p"] == pytest.approx(p) and c["p_holm"] == pytest.approx(p)
    assert c["diff_points"] == pytest.approx(100 * (np.mean(accs["fast"]) - np.mean(accs["main"])))
    g0 = comp["groups"][0]["stats"]["test_acc"]
    assert (g0["mean"], g0["lo"], g0["hi"]) == pytest.approx(S.mean_ci(accs["main"]))
    assert [d["key"] for d in comp["differs"]] == ["optim.lr"]
    html = (root / "study.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and 'src="plots' not in html
    assert "Paired t-test" in html and "fast: " in html
    md = (root / "study.md").read_text()
    assert "| learning rate (optim.lr) | 0.01 | 0.03 |" in md and "![Training curves](plots/study_curves.png)" in md

    before = mtimes(root / "main")
    again = study.run_study(C.load(tiny(tmp_path, variations={"main": {}, "fast": {"optim.lr": 0.03}}, repeats=2)),
                            quiet=True)
    assert set(again.status.values()) == {"done"} and mtimes(root / "main") == before


def test_single_runs_use_mcnemar_and_compare_cli_agrees(tmp_path, capsys):
    cfg = C.load(tiny(tmp_path, variations={"main": {}, "slow": {"optim.lr": 0.001},
                                            "wd": {"optim.weight_decay": 0.1}}))
    study.run_study(cfg, quiet=True)
    root = tmp_path / "st"
    comp = json.loads((root / "comparison.json").read_text())
    a, b = correct_by_id(load_run(root / "main")), correct_by_id(load_run(root / "slow"))
    ids = sorted(a)
    right_a, right_b = np.array([a[i][1] for i in ids]), np.array([b[i][1] for i in ids])
    only_b, only_a = int((right_b & ~right_a).sum()), int((right_a & ~right_b).sum())
    slow = comp["comparisons"][0]
    assert slow["test"] == "mcnemar" and (slow["only_variation"], slow["only_baseline"]) == (only_b, only_a)
    assert slow["p"] == pytest.approx(S.mcnemar(right_a, right_b)[1])
    ps = [c["p"] for c in comp["comparisons"]]
    assert [c["p_holm"] for c in comp["comparisons"]] == pytest.approx(list(S.holm(ps)))
    assert "Holm-corrected for the 2 comparisons" in slow["text"]["detail"]

    out = tmp_path / "cmp"
    assert cli.main(["compare", str(root / "slow"), str(root / "main"), "--out", str(out), "--baseline", "main"]) == 0
    (c2,) = json.loads((out / "comparison.json").read_text())["comparisons"]
    assert c2["name"] == "slow" and c2["p"] == pytest.approx(slow["p"]) and c2["p_holm"] == pytest.approx(slow["p"])
    assert "slow: " in capsys.readouterr().out and (out / "study.html").is_file()
    assert cli.main(["compare", str(tmp_path / "nothing")]) == 2
    # without --out: beside the runs, never in the working directory
    assert cli.main(["compare", str(root / "slow"), str(root / "main")]) == 0
    assert (root / "comparison-slow-vs-main" / "study.html").is_file() and not Path("comparison").exists()


def test_failed_variation_is_reported_and_the_others_finish(tmp_path, monkeypatch, capsys):
    from cnnlab.training import experiment

    def broken_report(run_dir, say):
        raise AttributeError("the per-run report broke")

    monkeypatch.setattr(experiment, "_report", broken_report)  # after metrics.json: the run itself is done
    tree = tiny(tmp_path, variations={"main": {}, "broken": {"model.options": {"no_such_option": 1}}})
    tree["output"]["report"] = True
    with pytest.raises(study.StudyError, match=r"(?s)1 of 2 runs .* broken: ModelConfigError"):
        study.run_study(C.load(tree))
    assert "main was trained and evaluated (metrics.json), but then: AttributeError" in capsys.readouterr().out
    man = json.loads((tmp_path / "st" / "study.json").read_text())
    assert [r["status"] for v in man["variations"] for r in v["runs"]] == ["done", "failed"]
    assert (tmp_path / "st" / "study.html").is_file()
    # the CLI: the rerun trains only the broken variation, which fails again: exit 1 and the reason, no traceback
    assert cli.main(["train", str(_write_yaml(tmp_path, tree, "st")), "--executor", "inline"]) == 1
    err = capsys.readouterr().err
    assert "1 of 2 runs" in err and "ModelConfigError" in err and "Traceback" not in err


def _write_yaml(tmp_path: Path, tree: dict, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def test_sigkill_half_way_then_rerun_completes_only_the_missing_run(tmp_path, capsys):
    tree = tiny(tmp_path, name="killed", variations={"main": {}, "l2": {"optim.weight_decay": 1e-4}})
    tree["train"]["epochs"] = 6
    path = _write_yaml(tmp_path, tree, "killed")
    root = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cnnlab", "train", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    last = root / "l2" / "checkpoints" / "last.pt"
    while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # the second run has saved its first epoch's checkpoint: kill the whole study
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert study.run_state(root / "main") == "done" and study.run_state(root / "l2") == "partial"
    finished = mtimes(root / "main")

    resumed = study.run_study(C.load(path))
    assert set(resumed.status.values()) == {"done"} and mtimes(root / "main") == finished
    out = capsys.readouterr().out
    assert "1 done, 1 to run" in out and "[1/1] l2 (resuming)" in out  # from its last.pt, not from scratch

    ref = tiny(tmp_path, name="uninterrupted", variations=tree["variations"])
    ref["train"]["epochs"] = 6
    study.run_study(C.load(ref), quiet=True)
    assert numbers(root) == numbers(tmp_path / "uninterrupted")


def test_jobs_run_parallel_subprocesses(tmp_path):
    path = _write_yaml(tmp_path, tiny(tmp_path, name="par", variations={"main": {}, "fast": {"optim.lr": 0.03}}), "par")
    assert cli.main(["train", str(path), "--jobs", "2"]) == 0
    root = tmp_path / "par"
    assert json.loads((root / "study.json").read_text())["complete"]
    for name in ("main", "fast"):
        assert (root / name / "metrics.json").is_file()
        assert "test accuracy" in (root / "logs" / f"{name}.log").read_text()
        assert json.loads((root / name / "env.json").read_text())["torch_threads"] == max(1, os.cpu_count() // 2)
    assert (root / "study.html").is_file()


def test_ray_executor_on_a_local_instance(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is optional (pip install 'cnnlab[ray]')")
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)  # GPUs as Ray resources only
    try:
        cfg = C.load(tiny(tmp_path, name="ray", variations={"main": {}, "fast": {"optim.lr": 0.03}}))
        st = study.run_study(cfg, executor="ray", jobs=2, quiet=True)
    finally:
        ray.shutdown()
    root = tmp_path / "ray"
    assert set(st.status.values()) == {"done"}
    # a cluster with GPUs gives each trial one (Ray hides GPUs from tasks that do not ask: they trained on CPUs)
    gpus = {json.loads((root / v / "env.json").read_text())["cuda_visible_devices"] for v in ("main", "fast")}
    assert gpus == {"0", "1"}
    assert C.load(root / "fast" / "config.yaml").output.dir == str(root)  # the study's path, not the worker's
    assert {p.name for p in (root / "main").iterdir()} >= {"metrics.json", "predictions.csv", "checkpoints"}
    assert json.loads((root / "comparison.json").read_text())["comparisons"][0]["test"] == "mcnemar"
