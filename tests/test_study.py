"""Studies end to end on `digits` with a tiny model: planning, folders and manifest, resuming after a SIGKILL,
parallel subprocesses, Ray, the report's statistics and `cnnlab compare`."""
from __future__ import annotations

import json
import re
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
from cnnlab.studies.compare import correct_by_id, pick_baseline

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


@pytest.mark.xdist_group("ray")
def test_ray_executor_on_a_local_instance(tmp_path, ray_local):  # conftest: 2 CPUs, 2 GPUs as Ray resources only
    cfg = C.load(tiny(tmp_path, name="ray", variations={"main": {}, "fast": {"optim.lr": 0.03}}))
    st = study.run_study(cfg, executor="ray", jobs=2, quiet=True)
    root = tmp_path / "ray"
    assert set(st.status.values()) == {"done"}
    # a cluster with GPUs gives each trial one (Ray hides GPUs from tasks that do not ask: they trained on CPUs)
    gpus = {json.loads((root / v / "env.json").read_text())["cuda_visible_devices"] for v in ("main", "fast")}
    assert gpus == {"0", "1"}
    assert C.load(root / "fast" / "config.yaml").output.dir == str(root)  # the study's path, not the worker's
    assert {p.name for p in (root / "main").iterdir()} >= {"metrics.json", "predictions.csv", "checkpoints"}
    assert json.loads((root / "comparison.json").read_text())["comparisons"][0]["test"] == "mcnemar"


# ---- issue 18: verdicts in the terminal, a rerun with other settings, compare's folders, names and data


def _verdicts(out: str) -> dict[str, str]:
    """{variation: its terminal line} from what a study or compare printed."""
    return {m.group(1): m.group(0) for m in re.finditer(r"(?m)^  (\S+):\s+\d+\.\d\d% \[.*$", out)}


def test_a_study_prints_each_verdict_and_refuses_a_rerun_with_other_settings(tmp_path, capsys):
    tree = tiny(tmp_path, variations={"main": {}, "slow": {"optim.lr": 0.001}})
    path = _write_yaml(tmp_path, tree, "st")
    assert cli.main(["train", str(path)]) == 0
    out, root = capsys.readouterr().out, tmp_path / "st"
    comp = json.loads((root / "comparison.json").read_text())
    g = {x["name"]: x for x in comp["groups"]}
    (c,) = comp["comparisons"]
    line = _verdicts(out)["slow"]  # its accuracy, 95% interval, difference and verdict, as compare prints them
    lo, hi = g["slow"]["interval"]
    assert f"{100 * g['slow']['stats']['test_acc']['mean']:.2f}% [{100 * lo:.1f}, {100 * hi:.1f}]" in line
    assert f"{c['diff_points']:+.2f} points: {c['verdict']}" in line and "McNemar" in line
    assert c["verdict"] == ("no real difference" if not c["significant"] else "better" if c["diff_points"] > 0
                            else "worse")
    assert f"baseline main: {100 * g['main']['stats']['test_acc']['mean']:.2f}%" in out
    assert f'<span class="sev">{c["verdict"]}</span>' in (root / "study.html").read_text()  # the page says the same

    # the same study with another learning rate: refused, naming what differs, and nothing is rewritten
    before = mtimes(root)
    assert cli.main(["train", str(path), "optim.lr=0.05"]) == 2
    err = capsys.readouterr().err
    assert "main: optim.lr=0.01 (this config: 0.05)" in err and "slow" not in err  # slow keeps its own 0.001
    assert "output.name=st-2" in err and "--fresh" in err and "Traceback" not in err
    assert mtimes(root) == before
    # --fresh: every run trained again with the new settings, the study files agree with the runs
    assert cli.main(["train", str(path), "optim.lr=0.05", "--fresh"]) == 0
    assert C.load(root / "main" / "config.yaml").optim.lr == 0.05 and C.load(root / "study.yaml").optim.lr == 0.05
    assert C.load(root / "slow" / "config.yaml").optim.lr == 0.001
    assert "deleted 2 run folder(s)" in capsys.readouterr().out


def test_one_variation_again_is_kept_not_trained_beside_it_and_other_settings_are_refused(tmp_path, capsys):
    path = _write_yaml(tmp_path, tiny(tmp_path, variations={"main": {}, "slow": {"optim.lr": 0.001}}), "st")
    root = tmp_path / "st"
    assert cli.main(["train", str(path), "--variation", "slow"]) == 0
    before = mtimes(root)
    capsys.readouterr()
    assert cli.main(["train", str(path), "--variation", "slow"]) == 0
    assert "slow: already trained" in capsys.readouterr().out
    assert mtimes(root) == before and not (root / "slow-2").exists()
    assert cli.main(["train", str(path), "--variation", "slow", "train.batch_size=64"]) == 2
    assert "slow: train.batch_size=128 (this config: 64)" in capsys.readouterr().err and mtimes(root) == before


def test_retrain_changed_trains_again_only_the_runs_whose_settings_moved(tmp_path):
    """(a search's repeats of its best settings, which move as the search goes on)"""
    tree = tiny(tmp_path, variations={"baseline": {}, "best": {"optim.lr": 0.003}})
    study.run_study(C.load(tree), quiet=True, report=False)
    kept = mtimes(tmp_path / "st" / "baseline")
    tree["variations"]["best"] = {"optim.lr": 0.02}
    with pytest.raises(study.ChangedStudyError, match="best: optim.lr=0.003"):
        study.run_study(C.load(tree), quiet=True, report=False)
    study.run_study(C.load(tree), quiet=True, report=False, retrain_changed=True)
    assert mtimes(tmp_path / "st" / "baseline") == kept
    assert C.load(tmp_path / "st" / "best" / "config.yaml").optim.lr == 0.02


def test_a_failed_baseline_leaves_no_report_and_the_failure_is_what_is_reported(tmp_path, capsys):
    tree = tiny(tmp_path, variations={"main": {"model.options": {"no_such_option": 1}}, "other": {}})
    with pytest.raises(study.StudyError, match=r"(?s)1 of 2 runs .* main: ModelConfigError"):
        study.run_study(C.load(tree))
    assert "no study report: the baseline main has no finished run" in capsys.readouterr().out
    assert not (tmp_path / "st" / "study.html").exists() and (tmp_path / "st" / "other" / "metrics.json").is_file()


@pytest.fixture(scope="module")
def two_studies(tmp_path_factory):
    """Two finished studies with the same variation names (st, st2), one seed each."""
    tmp = tmp_path_factory.mktemp("two")
    for name, lr in (("st", 0.01), ("st2", 0.03)):
        tree = tiny(tmp, name=name, variations={"main": {}, "wd": {"optim.weight_decay": 0.1}})
        tree["optim"]["lr"] = lr
        study.run_study(C.load(tree), quiet=True, report=name == "st")  # (st's own report is checked below)
    return tmp


def test_compare_of_a_study_with_another_baseline_leaves_the_studys_report_alone(two_studies, capsys):
    root = two_studies / "st"
    own = {f: (root / f).read_bytes() for f in ("study.html", "study.md", "comparison.json")}
    assert cli.main(["compare", str(root), "--baseline", "wd"]) == 0
    out = capsys.readouterr().out
    assert {f: (root / f).read_bytes() for f in own} == own
    other = two_studies / "comparison-st-baseline-wd"
    assert f"comparison: {other / 'study.html'}" in out and "main" in _verdicts(out)
    assert json.loads((other / "comparison.json").read_text())["baseline"] == "wd"
    # --out into a study folder (or a run folder) is refused before anything is written
    assert cli.main(["compare", str(root), "--baseline", "wd", "--out", str(root)]) == 2
    assert cli.main(["compare", str(root), str(two_studies / "st2"), "--out", str(root / "main")]) == 2
    assert "a study folder" in capsys.readouterr().err
    assert {f: (root / f).read_bytes() for f in own} == own and not (root / "main" / "study.html").exists()


def test_comparing_two_studies_names_each_variation_by_its_study(two_studies, capsys):
    a, b = two_studies / "st", two_studies / "st2"
    assert cli.main(["compare", str(a), str(b), "--out", str(two_studies / "ab")]) == 0
    comp = json.loads((two_studies / "ab" / "comparison.json").read_text())
    assert [g["name"] for g in comp["groups"]] == ["st/main", "st/wd", "st2/main", "st2/wd"]
    assert comp["baseline"] == "st/main" and set(_verdicts(capsys.readouterr().out)) == {"st/wd", "st2/main", "st2/wd"}
    assert "| st2/main | 1 |" in (two_studies / "ab" / "study.md").read_text()
    # a variation's bare name is the baseline when it is unambiguous; else the message lists the choices
    assert cli.main(["compare", str(a), str(b), "--baseline", "main", "--out", str(two_studies / "ab2")]) == 2
    assert "st/main, st2/main" in capsys.readouterr().err and not (two_studies / "ab2").exists()
    assert pick_baseline(["st/main", "st/wd", "st2/main"], "wd") == "st/wd"
    assert pick_baseline(["st/main", "st2/main"], "st2/main") == "st2/main"


def test_compare_of_one_run_is_refused_and_writes_nothing(two_studies, capsys):
    run = two_studies / "st" / "main"
    before = sorted(p.name for p in two_studies.iterdir())
    assert cli.main(["compare", str(run)]) == 2
    err = capsys.readouterr().err
    assert "is one run" in err and "two or more" in err and "Traceback" not in err
    assert sorted(p.name for p in two_studies.iterdir()) == before and not (run / "comparison.json").exists()
    assert cli.main(["compare", str(run), str(run)]) == 2 and "given twice" in capsys.readouterr().err


def test_runs_on_different_data_say_so_and_name_the_split_of_their_accuracy(two_studies, tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    for name, data in (("folder", {"name": "folder", "root": str(tmp_path / "imgs"), "val_split": 0.25}),
                       ("digits-val", {"name": "digits"})):  # no test split: evaluated on the validation split
        tree = tiny(tmp_path, name=name)
        tree["data"] = data
        cnnlab.train(tree, quiet=True)
    # digits (test split) against a folder of images (val split): the header says so, nothing is tested
    assert cli.main(["compare", str(two_studies / "st" / "main"), str(tmp_path / "folder"),
                     "--out", str(tmp_path / "c1")]) == 0
    out = capsys.readouterr().out
    comp = json.loads((tmp_path / "c1" / "comparison.json").read_text())
    assert comp["eval_splits"] == {"main": "test", "folder": "val"} and comp["eval_split"] is None
    assert comp["comparisons"][0]["test"] is None and comp["comparisons"][0]["verdict"] == "not tested"
    assert "different data (digits for main, folder for folder)" in comp["data_note"]
    assert "measured on the test split for main, val split for folder" in comp["data_note"]
    assert comp["setup"].startswith("layers on different data") and "note: The runs were evaluated on" in out
    md = (tmp_path / "c1" / "study.md").read_text()
    assert "**The data differ.**" in md and "| evaluated on |" in md and "test acc" not in md
    assert "| main | 1 | test |" in md and "| folder | 1 | val |" in md
    # two runs evaluated on validation images: the column says val, never test
    assert cli.main(["compare", str(tmp_path / "digits-val"), str(tmp_path / "folder"),
                     "--out", str(tmp_path / "c2")]) == 0
    md = (tmp_path / "c2" / "study.md").read_text()
    assert "| val acc |" in md and "test acc" not in md.lower()
    html = (tmp_path / "c2" / "study.html").read_text()
    assert "<th>val acc</th>" in html and "test acc" not in html.lower() and "the data differ" in html


def test_a_variation_that_sets_a_command_line_key_again_is_noted(tmp_path):
    # `cnnlab train study.yaml train.epochs=1` as a smoke test: a variation with its own train.epochs still
    # trains 100 epochs (its settings win, as they must in a study); the user is told so before any work
    tree = tiny(tmp_path, variations={"main": {}, "long": {"train.epochs": 100}, "same": {"train.epochs": 1},
                                      "lr": {"optim.lr": 0.1}})
    cli_overrides = ["train.epochs=1", "optim.lr=0.1"]
    planned = study.plan(C.load(tree, cli_overrides))
    assert study.shadowed(planned, cli_overrides) == [
        "note: long sets train.epochs=100, over the command line's train.epochs=1 (a variation's own settings "
        "win in its runs)"]
    assert study.shadowed(planned, []) == []
