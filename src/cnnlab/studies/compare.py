"""`cnnlab compare`: any finished run folders and study folders, loaded as groups (one per variation, one
run per seed) and each tested against the baseline (exact McNemar on the shared test set for single runs,
t-tests over seeds, Holm over the comparisons). Writes comparison.json here and, through
studies/report.py, plots/, study.html and study.md. Also owns which config keys make two runs differ.

Imports: rundir, analysis.stats, studies.report (the pages); never studies.study (which imports this)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnlab import config as C
from cnnlab import rundir as R
from cnnlab.errors import InputError
from cnnlab.rundir import RunDir
from cnnlab.studies import report as pages
from cnnlab.studies.report import METRICS, fmt_p

ALPHA = 0.05
STUDY_KEYS = ("variations", "grid", "repeats", "baseline", "search")  # a study config's own keys
IGNORED = ("output.", "train.progress", "train.threads")  # keys that may differ without changing a run's result
COMPARE_IGNORED = IGNORED + STUDY_KEYS  # what compare never lists as "what differs"
LABELS = {"model.batchnorm": "batch norm", "optim.weight_decay": "weight decay (L2)", "model.dropout": "dropout",
          "optim.lr": "learning rate", "optim.name": "optimizer", "model.name": "model", "train.epochs": "epochs",
          "train.batch_size": "batch size", "schedule.name": "LR schedule", "train.seed": "seed",
          "data.augment.hflip": "horizontal flips", "data.augment.crop_padding": "random-crop padding",
          "data.augment.crop_padding_mode": "crop padding mode",
          "data.augment.cutout": "cutout", "train.label_smoothing": "label smoothing", "model.init": "weight init",
          "train.ema": "weight EMA", "optim.momentum": "momentum", "data.name": "data set"}


def fmt_value(v) -> str:
    """A setting as people write it: 1e-5 not 1e-05, true/false, 0.5."""
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    if not isinstance(v, float):
        return str(v)
    if v and abs(v) < 1e-3 or abs(v) >= 1e6:
        m, e = f"{v:.6e}".split("e")
        return f"{m.rstrip('0').rstrip('.')}e{int(e)}"
    return f"{v:g}"


class CompareError(InputError, ValueError):
    """A comparison that cannot be made as asked (one run, a folder given twice, an unknown baseline, an --out
    that is a run's or another study's folder); nothing is written."""


@dataclass
class Group:
    name: str
    runs: list[RunDir]


def load_run(d: str | Path) -> RunDir:
    """A finished run folder, its history and test results checked: a damaged file is refused naming it."""
    run = R.load_run(d, finished=True)
    for row in run.history:
        for k, v in row.items():
            if not isinstance(v, (int, float)) and v is not None:
                raise R.RunFileError(f"{run.dir / R.HISTORY}: damaged, column {k!r} holds {v!r}, not a number")
    metrics = run.metrics or {}
    if not isinstance(metrics.get("test"), dict) or "accuracy" not in metrics["test"]:
        raise R.RunFileError(f"{run.dir / R.METRICS}: no 'test' results in it (the accuracy on the evaluated split, "
                             "test or val); not a finished cnnlab run, or damaged")
    return run


def _labels(paths: list[Path]) -> list[str]:
    """A short name per compared folder: its own name, or its path from the folders' common parent when
    two share a name (runs/a/st and runs/b/st -> a/st, b/st)."""
    names = [p.resolve().name for p in paths]
    if len(set(names)) == len(names):
        return names
    common = Path(os.path.commonpath([p.resolve().parent for p in paths]))
    return [p.resolve().relative_to(common).as_posix() for p in paths]


def load_groups(paths) -> tuple[list[Group], str | None, list[dict]]:
    """Groups from study folders (study.json: one group per variation) and run folders (one group each);
    also the study's baseline and its run list (with statuses). With more than one folder compared, a
    study's variations are named by their study (studyA/main, studyB/main)."""
    paths = [Path(p) for p in paths]
    groups, base, listing = [], None, []
    for p, label in zip(paths, _labels(paths)):
        if (p / R.STUDY_JSON).is_file():
            man = R.read_json(p / R.STUDY_JSON) or {}
            tag = f"{label}/" if len(paths) > 1 else ""
            base = base or (tag + man["baseline"] if man.get("baseline") else None)
            for v in man["variations"]:
                runs = [load_run(p / r["dir"]) for r in v["runs"] if RunDir(p / r["dir"]).finished]
                listing += [{**r, "dir": str(p / r["dir"]), "variation": tag + v["name"]} for r in v["runs"]]
                if runs:
                    groups.append(Group(tag + v["name"], runs))
        elif RunDir(p).finished:
            groups.append(Group(label, [load_run(p)]))
            listing.append({"dir": str(p), "variation": label, "seed": groups[-1].runs[0].seed, "status": "done"})
        else:
            raise FileNotFoundError(f"{p}: neither a run folder ({R.METRICS}) nor a study folder ({R.STUDY_JSON})")
    names = [g.name for g in groups]
    if len(set(names)) != len(names):  # a run folder named like another study's variation
        twice = sorted(n for n in set(names) if names.count(n) > 1)
        raise CompareError(f"two of the compared groups have the same name: {twice}; rename one of the folders")
    return groups, base, listing


def pick_baseline(names: list[str], wanted: str | None) -> str:
    """The baseline among the group names: exact, or the one variation of that name in several studies'
    groups (--baseline main when only studyA/main exists); an unknown or ambiguous name is refused."""
    import difflib

    if wanted is None:
        return names[0]
    if wanted in names:
        return wanted
    tails = [n for n in names if n.rsplit("/", 1)[-1] == wanted]
    if len(tails) == 1:
        return tails[0]
    hint = (f" It names {len(tails)} groups: say which ({', '.join(tails)})." if tails else
            "".join(f" Did you mean {c!r}?" for c in difflib.get_close_matches(wanted, names, n=1)))
    raise CompareError(f"--baseline {wanted!r} is not among the compared runs.{hint} They are: {', '.join(names)}")


# ----------------------------------------------------------------------------------------------
# Analysis (plain, JSON-able numbers)


def _values(g: Group, key: str) -> list[float]:
    get = {"best_epoch": lambda r: r.metrics.get("best_epoch"), "best_val_acc": lambda r: r.metrics.get("best_val_acc"),
           "test_acc": lambda r: r.metrics["test"]["accuracy"], "test_loss": lambda r: r.metrics["test"].get("loss"),
           "params": lambda r: r.params, "train_seconds": lambda r: r.seconds}[key]
    return [float(v) for v in map(get, g.runs) if v is not None]


def onset_epoch(run: RunDir) -> int | None:
    """The epoch from which the run overfits, by the diagnostics' rule (diagnose.overfitting_onset), or None."""
    from cnnlab.analysis.diagnose import overfitting_onset

    o = overfitting_onset(run.history_columns)
    return None if o is None else o["epoch"]


def correct_by_id(run: RunDir) -> dict[str, tuple[int, bool]]:
    """id -> (target, classified right) from predictions.csv."""
    return {r["id"]: (int(r["target"]), r["target"] == r["pred"]) for r in run.predictions}


def test_pair(a: Group, b: Group) -> dict:
    """b against baseline a: t-test over seeds when both have repeats (paired when the seeds match), else
    the exact McNemar test on the test images of one run each (with the same seed when there is one)."""
    from cnnlab.analysis import stats as S

    sa, sb = {r.seed: r for r in a.runs}, {r.seed: r for r in b.runs}
    if len(a.runs) > 1 and len(b.runs) > 1:
        if set(sa) == set(sb):
            seeds = sorted(sa)
            t, p = S.paired_t([sb[s].metrics["test"]["accuracy"] for s in seeds],
                              [sa[s].metrics["test"]["accuracy"] for s in seeds])
            return {"test": "paired_t", "statistic": t, "p": p, "n": len(seeds)}
        t, p = S.welch_t(_values(b, "test_acc"), _values(a, "test_acc"))
        return {"test": "welch_t", "statistic": t, "p": p, "n": [len(b.runs), len(a.runs)]}
    shared = sorted(set(sa) & set(sb))
    ra, rb = (sa[shared[0]], sb[shared[0]]) if shared else (a.runs[0], b.runs[0])
    ca, cb = correct_by_id(ra), correct_by_id(rb)
    if set(ca) != set(cb) or any(ca[i][0] != cb[i][0] for i in ca):
        return {"test": None, "why": "the runs were evaluated on different test images (different data or splits)"}
    ids = sorted(ca)
    right_a, right_b = np.array([ca[i][1] for i in ids]), np.array([cb[i][1] for i in ids])
    only_a, only_b = S.discordant(right_a, right_b)
    stat, p = S.mcnemar(right_b, right_a)
    return {"test": "mcnemar", "statistic": stat, "p": p, "n": len(ids), "only_variation": only_b,
            "only_baseline": only_a, "seeds": [ra.seed, rb.seed]}


def _setting(v, key: str = "", cfg: dict | None = None) -> str:
    """A value as people write it; a model setting left at null shows the builder's own default."""
    if v is None and key.startswith("model.") and cfg:
        try:
            import inspect

            from cnnlab.models import MODELS

            p = inspect.signature(MODELS.get(cfg.get("model.name"))).parameters.get(key.split(".")[-1])
            if p is not None and p.default is not inspect.Parameter.empty:
                return f"{_setting(p.default)} (default)"
        except (KeyError, ValueError, TypeError):
            pass
    return "default" if v is None else ("yes" if v else "no") if isinstance(v, bool) else fmt_value(v)


def evaluated(run: RunDir) -> tuple[str, str]:
    """(the split a run's metrics.json "test" results hold: test or val, a fingerprint of those images: their
    ids with their labels): two runs can be set side by side image by image only when both agree."""
    import hashlib

    rows = sorted(f"{r['id']}\t{r['target']}" for r in run.predictions)
    return run.metrics.get("eval_split") or "test", hashlib.sha1("\n".join(rows).encode()).hexdigest()[:16]


def _data_note(names: list[str], firsts: dict, seen: dict) -> str | None:
    """None when every group was evaluated on the same images; else what differs, in words."""
    if len(set(seen.values())) == 1:
        return None
    by = lambda f: ", ".join(f"{f(n)} for {n}" for n in names)  # noqa: E731
    data = {n: firsts[n].get("data.name") for n in names}
    what = (f"different data ({by(lambda n: data[n])})" if len(set(data.values())) > 1 else
            f"different images of {data[names[0]]} (their data.* settings differ: splits, root or size)")
    splits = {n: seen[n][0] for n in names}
    where = (f"; the accuracy is measured on the {by(lambda n: splits[n] + ' split')}"
             if len(set(splits.values())) > 1 else "")
    return (f"The runs were evaluated on {what}{where}. Their accuracies are not measured on the same images, "
            "so they are not tested against each other.")


def analyze(groups: list[Group], baseline: str | None = None) -> dict:
    """The comparison as plain, JSON-able numbers (comparison.json): what differs, per-group statistics,
    each variation tested against the baseline with Holm's correction (only on the images both were
    evaluated on: `eval_split` is the split every group's accuracy is on, None when they differ)."""
    from cnnlab.analysis import stats as S

    names = [g.name for g in groups]
    base = pick_baseline(names, baseline)
    bg = groups[names.index(base)]
    firsts = {g.name: C.flatten(g.runs[0].config_dict) for g in groups}
    keys = sorted(set().union(*firsts.values()))
    differ = [k for k in keys if not k.startswith(COMPARE_IGNORED)
              and len({json.dumps(c.get(k), sort_keys=True) for c in firsts.values()}) > 1]
    classes = [c["name"] for c in bg.runs[0].metrics["test"]["per_class"]]
    seen = {g.name: evaluated(g.runs[0]) for g in groups}
    splits = {n: seen[n][0] for n in names}
    note = _data_note(names, firsts, seen)
    c0 = firsts[base]
    model = c0.get("model.name") if "model.name" not in differ else "different models"
    data = (("on different data" if "data.name" in differ else "on different images") if note
            else f"on {c0.get('data.name')}")
    rest = {"optim.name": c0.get("optim.name"), "optim.lr": f"lr {_setting(c0.get('optim.lr'))}",
            "train.epochs": f"{c0.get('train.epochs')} epoch{'' if c0.get('train.epochs') == 1 else 's'}",
            "train.batch_size": f"batch {c0.get('train.batch_size')}"}
    setup = [f"{model} {data}"] + [str(v) for k, v in rest.items() if k not in differ]
    out = {"baseline": base, "alpha": ALPHA, "setup": ", ".join(setup),
           "classes": classes, "data_note": note,
           "eval_split": splits[base] if len(set(splits.values())) == 1 else None, "eval_splits": splits,
           "differs": [{"key": k, "label": LABELS.get(k, k),
                        "values": {n: _setting(firsts[n].get(k), k, firsts[n]) for n in names}} for k in differ],
           "groups": [], "comparisons": []}
    for g in groups:
        pc = np.mean([[c["accuracy"] for c in r.metrics["test"]["per_class"]] for r in g.runs], axis=0)
        st = {k: S.describe(_values(g, k)) for k, _ in METRICS}
        acc, n = st["test_acc"], g.runs[0].metrics["test"].get("n") or len(g.runs[0].predictions)
        # the accuracy's 95% interval: t over the seeds, or for one run Wilson over its test images
        ci = (acc["lo"], acc["hi"]) if acc["n"] > 1 else S.proportion_ci(round(acc["mean"] * n), n)
        out["groups"].append({"name": g.name, "seeds": [r.seed for r in g.runs], "dirs": [str(r.dir) for r in g.runs],
                              "stats": st, "interval": [max(0.0, float(ci[0])), min(1.0, float(ci[1]))],
                              "n_images": int(n),
                              "eval_split": splits[g.name], "overfit_onset": [onset_epoch(r) for r in g.runs],
                              "per_class_acc": pc.tolist()})
    tests = [(g, test_pair(bg, g) if seen[g.name] == seen[base] else
              {"test": None, "why": "the runs were evaluated on different images"})
             for g in groups if g.name != base]
    valid = [t for _, t in tests if t["test"]]
    for t, adj in zip(valid, S.holm([t["p"] for t in valid])):
        t["p_holm"] = float(adj)
        t["significant"] = bool(adj < ALPHA)
    gstats = {d["name"]: d for d in out["groups"]}
    for g, t in tests:
        diff = 100 * (gstats[g.name]["stats"]["test_acc"]["mean"] - gstats[base]["stats"]["test_acc"]["mean"])
        pa, pb = np.array(gstats[g.name]["per_class_acc"]), np.array(gstats[base]["per_class_acc"])
        pcd = (pa - pb) * 100 if pa.shape == pb.shape and not note else np.array([])  # other data: not side by side
        verdict = ("not tested" if not t["test"] else "no real difference" if not t["significant"]
                   else "better" if diff > 0 else "worse")
        out["comparisons"].append({"name": g.name, "diff_points": diff, "per_class_diff_points": pcd.tolist(),
                                   **t, "verdict": verdict,
                                   "text": sentence(g.name, base, diff, t, len(valid), gstats, splits[base])})
    return out


def sentence(name: str, base: str, diff: float, t: dict, m: int, gstats: dict, split: str = "test") -> dict:
    """{'head': 'batchnorm: +0.40 points, not significant, p = 0.61', 'detail': how it was tested}."""
    acc = lambda n: f"{100 * gstats[n]['stats']['test_acc']['mean']:.2f}%"  # noqa: E731
    head = f"{name}: {diff:+.2f} points ({acc(base)} → {acc(name)})"
    if not t["test"]:
        return {"head": f"{head}, not tested", "detail": f"No significance test: {t['why']}."}
    p = t["p_holm"]
    head += f", {'significant' if t['significant'] else 'not significant'}, {fmt_p(p)}"
    if t["test"] == "mcnemar":
        seed = f" (seed {t['seeds'][1]})" if len(gstats[name]["seeds"]) > 1 or len(gstats[base]["seeds"]) > 1 else ""
        n_diff = t["only_variation"] + t["only_baseline"]
        detail = f"Exact McNemar test on the {t['n']:,} shared {split} images{seed}: " + (
            f"{n_diff:,} are classified right by one model only, {t['only_variation']:,} by {name} and "
            f"{t['only_baseline']:,} by {base}." if n_diff else "both get exactly the same images right.")
    elif t["test"] == "paired_t":
        detail = f"Paired t-test of {split} accuracy over {t['n']} seeds (t = {t['statistic']:.2f}, {t['n'] - 1} df)."
    else:
        detail = (f"Welch's t-test of {split} accuracy over {t['n'][0]} and {t['n'][1]} seeds "
                  f"(unpaired: the seeds differ; t = {t['statistic']:.2f}).")
    if m > 1:
        detail += f" Holm-corrected for the {m} comparisons against {base} (uncorrected {fmt_p(t['p'])})."
    if t["test"] == "mcnemar":  # one trained model each: training's own seed-to-seed spread is not in the test
        detail += (" This compares these two trained models; another seed can move either by a few tenths of a "
                   "point, so for a claim about the setting itself add `repeats: 3` or more (a t-test over seeds).")
    return {"head": head, "detail": detail}


def _plain(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    return o


def default_out(paths: list[Path], baseline: str | None = None) -> Path:
    """Beside the runs, not in the working directory: runs/a + runs/b -> runs/comparison-a-vs-b; a study
    against another baseline: runs/comparison-st-baseline-X (the study's own study.html stays its own)."""
    parents = [p.resolve().parent for p in paths]
    base = Path(os.path.commonpath(parents))
    try:
        base = base.relative_to(Path.cwd())
    except ValueError:
        pass
    name = "comparison-" + "-vs-".join(p.resolve().name for p in paths)
    if baseline:
        name += "-baseline-" + baseline.replace("/", "_")
    return base / (name if len(name) <= 80 else name[:80].rstrip("-"))


def _check_request(paths: list[Path], out: Path | None, own_study: bool) -> None:
    """Refuse, before anything is written: one run alone, a folder given twice, an --out that is a run
    folder or a study folder (only the study's own comparison, with its own baseline, is written there)."""
    if len(paths) == 1 and not (paths[0] / R.STUDY_JSON).is_file() and RunDir(paths[0]).finished:
        raise CompareError(f"{paths[0]} is one run: compare needs two or more run folders, or a study folder "
                           f"(its own report is {paths[0] / R.REPORT_HTML}); nothing was written")
    seen = {}
    for p in paths:
        if p.resolve() in seen:
            raise CompareError(f"{p} is given twice (as {seen[p.resolve()]} too); nothing was written")
        seen[p.resolve()] = p
    if out is None or not out.is_dir():
        return
    if (out / R.STUDY_JSON).is_file() and not own_study:
        raise CompareError(f"--out {out}: a study folder, whose study.html is that study's own report; write "
                           "this comparison elsewhere (or leave out --out); nothing was written")
    if R.is_run_dir(out):
        raise CompareError(f"--out {out}: a run folder; write the comparison elsewhere (or leave out --out); "
                           "nothing was written")


def compare(paths, *, out: str | Path | None = None, baseline: str | None = None, say=None) -> Path:
    """Compare run/study folders; writes comparison.json, study.html, study.md and the PNGs under `out`.
    A study compared alone with its own baseline is written into its folder (its study report); with
    another baseline, beside it. `say`: prints each variation's verdict (report.terminal)."""
    paths = [Path(p) for p in paths]
    study = len(paths) == 1 and (paths[0] / R.STUDY_JSON).is_file()
    _check_request(paths, None, False)
    groups, study_base, listing = load_groups(paths)
    if not groups:
        raise FileNotFoundError(f"no finished runs in {', '.join(map(str, paths))}")
    res = analyze(groups, baseline or study_base)  # (an unknown baseline is refused here, before writing)
    own = study and res["baseline"] == pick_baseline([g.name for g in groups], study_base)
    if out is None:
        out = paths[0] if own else default_out(paths, res["baseline"] if baseline else None)
    out = Path(out)
    _check_request(paths, out, own and out.resolve() == paths[0].resolve())
    out.mkdir(parents=True, exist_ok=True)
    title = paths[0].name if study else "comparison"
    R.write_json(out / R.COMPARISON_JSON, _plain(res))
    figs = pages.figures(res, groups, out / R.PLOTS)
    R.write_text(out / R.COMPARISON_MD, pages.markdown(res, title, figs, listing, out))
    R.write_text(out / R.COMPARISON_HTML, pages.html_page(res, title, figs, listing, out))
    if say:
        for line in pages.terminal(res):
            say(line)
    return out / R.COMPARISON_HTML


# ----------------------------------------------------------------------------------------------
# CLI: `cnnlab compare RUN_OR_STUDY ...`


def add_parser(subparsers) -> None:
    """Add `compare RUN_DIR...` to an argparse subparsers object (sets `func`, returning an exit code)."""
    c = subparsers.add_parser("compare", help="compare runs or a study: tables, curves, significance tests",
                              description="Compare finished run folders (each one variation) or study folders "
                                          "(their variations, with seeds): study.html, study.md, comparison.json.")
    c.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders and/or study folders")
    c.add_argument("--out", help="where to write the comparison (default: the study folder when one study is "
                                 "given, else comparison-A-vs-B beside the runs)")
    c.add_argument("--baseline", help="the variation the others are tested against (default: the first)")
    c.set_defaults(func=main)


def main(args) -> int:
    path = compare(args.runs, out=args.out, baseline=args.baseline, say=print)
    print(f"comparison: {path}")
    return 0
