"""Comparing runs: load run or study folders as groups (one per variation, one run per seed), test each
against the baseline (exact McNemar on the shared test set for single runs, t-tests over seeds, Holm over
the comparisons) and write comparison.json, plots/, study.html (self-contained) and study.md."""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnlab import config as C
from cnnlab.analysis import stats as S
from cnnlab.studies.study import IGNORED, STUDY_KEYS, fmt_value

ALPHA = 0.05
IGNORED = IGNORED + STUDY_KEYS  # settings that never make two runs' results differ, and the study's own keys
LABELS = {"model.batchnorm": "batch norm", "optim.weight_decay": "weight decay (L2)", "model.dropout": "dropout",
          "optim.lr": "learning rate", "optim.name": "optimizer", "model.name": "model", "train.epochs": "epochs",
          "train.batch_size": "batch size", "schedule.name": "LR schedule", "train.seed": "seed",
          "data.augment.hflip": "horizontal flips", "data.augment.crop_padding": "random-crop padding",
          "data.augment.crop_padding_mode": "crop padding mode",
          "data.augment.cutout": "cutout", "train.label_smoothing": "label smoothing", "model.init": "weight init",
          "train.ema": "weight EMA", "optim.momentum": "momentum", "data.name": "data set"}
METRICS = [("best_epoch", "best epoch"), ("best_val_acc", "best val acc"), ("test_acc", "test acc"),
           ("test_loss", "test loss"), ("params", "parameters"), ("train_seconds", "train time")]


@dataclass
class Run:
    dir: Path
    seed: int
    config: dict  # flat dotted keys
    metrics: dict
    history: dict  # column -> list
    params: int | None
    seconds: float | None


@dataclass
class Group:
    name: str
    runs: list[Run]


def _json(path: Path) -> dict:
    from cnnlab.report.build import read_json

    return read_json(path) or {}


def load_run(d: str | Path) -> Run:
    d = Path(d)
    if not (d / "metrics.json").is_file():
        raise FileNotFoundError(f"{d}: not a finished run folder (no metrics.json in it)")
    cfg = C.flatten(C.load_yaml((d / "config.yaml").read_text()) or {}) if (d / "config.yaml").is_file() else {}
    from cnnlab.report.build import RunFileError, read_csv

    hist: dict = {}
    for row in read_csv(d / "history.csv"):  # a damaged file is refused naming it
        for k, v in row.items():
            if not isinstance(v, (int, float)) and v is not None:
                raise RunFileError(f"{d / 'history.csv'}: damaged, column {k!r} holds {v!r}, not a number")
            hist.setdefault(k, []).append(float("nan") if v is None else float(v))
    metrics = _json(d / "metrics.json")
    if not isinstance(metrics.get("test"), dict) or "accuracy" not in metrics["test"]:
        raise RunFileError(f"{d / 'metrics.json'}: no 'test' results in it (the accuracy on the evaluated split, "
                           "test or val); not a finished cnnlab run, or damaged")
    return Run(d, int(cfg.get("train.seed", 0)), cfg, metrics, hist,
               _json(d / "model.json").get("total_params"), _json(d / "env.json").get("train_seconds"))


def load_groups(paths) -> tuple[list[Group], str | None, list[dict]]:
    """Groups from study folders (study.json: one group per variation) and run folders (one group each);
    also the study's baseline and its run list (with statuses) when there is one study."""
    groups, base, listing = [], None, []
    for p in map(Path, paths):
        if (p / "study.json").is_file():
            man = _json(p / "study.json")
            base = base or man.get("baseline")
            for v in man["variations"]:
                runs = [load_run(p / r["dir"]) for r in v["runs"] if (p / r["dir"] / "metrics.json").is_file()]
                listing += [{**r, "dir": str(p / r["dir"]), "variation": v["name"]} for r in v["runs"]]
                if runs:
                    groups.append(Group(v["name"], runs))
        elif (p / "metrics.json").is_file():
            groups.append(Group(p.name, [load_run(p)]))
            listing.append({"dir": str(p), "variation": p.name, "seed": groups[-1].runs[0].seed, "status": "done"})
        else:
            raise FileNotFoundError(f"{p}: neither a run folder (metrics.json) nor a study folder (study.json)")
    names = [g.name for g in groups]
    for g in groups:  # the same folder name twice (e.g. two studies' main): prefix the parent's name
        if names.count(g.name) > 1:
            g.name = f"{g.runs[0].dir.parent.name}/{g.name}"
    if len({g.name for g in groups}) != len(groups):
        raise ValueError(f"two of the compared runs have the same name: {[g.name for g in groups]}")
    return groups, base, listing


# ----------------------------------------------------------------------------------------------
# Analysis (plain, JSON-able numbers)


def _values(g: Group, key: str) -> list[float]:
    get = {"best_epoch": lambda r: r.metrics.get("best_epoch"), "best_val_acc": lambda r: r.metrics.get("best_val_acc"),
           "test_acc": lambda r: r.metrics["test"]["accuracy"], "test_loss": lambda r: r.metrics["test"].get("loss"),
           "params": lambda r: r.params, "train_seconds": lambda r: r.seconds}[key]
    return [float(v) for v in map(get, g.runs) if v is not None]


def correct_by_id(run: Run) -> dict[str, tuple[int, bool]]:
    """id -> (target, classified right) from predictions.csv."""
    with open(run.dir / "predictions.csv", newline="") as f:
        return {r["id"]: (int(r["target"]), r["target"] == r["pred"]) for r in csv.DictReader(f)}


def test_pair(a: Group, b: Group) -> dict:
    """b against baseline a: t-test over seeds when both have repeats (paired when the seeds match), else
    the exact McNemar test on the test images of one run each (with the same seed when there is one)."""
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


def analyze(groups: list[Group], baseline: str | None = None) -> dict:
    names = [g.name for g in groups]
    base = baseline or names[0]
    if base not in names:
        raise ValueError(f"baseline {base!r} is not among the compared runs: {', '.join(names)}")
    bg = groups[names.index(base)]
    firsts = {g.name: g.runs[0].config for g in groups}
    keys = sorted(set().union(*firsts.values()))
    differ = [k for k in keys if not k.startswith(IGNORED)
              and len({json.dumps(c.get(k), sort_keys=True) for c in firsts.values()}) > 1]
    classes = [c["name"] for c in bg.runs[0].metrics["test"]["per_class"]]
    c0 = firsts[base]
    setup = {"model.name": f"{c0.get('model.name')} on {c0.get('data.name')}", "optim.name": c0.get("optim.name"),
             "optim.lr": f"lr {_setting(c0.get('optim.lr'))}", "train.epochs": f"{c0.get('train.epochs')} epoch{'' if c0.get('train.epochs') == 1 else 's'}",
             "train.batch_size": f"batch {c0.get('train.batch_size')}"}
    setup = [str(v) for k, v in setup.items() if k not in differ]
    out = {"baseline": base, "alpha": ALPHA, "setup": ", ".join(setup), "classes": classes,
           "eval_split": bg.runs[0].metrics.get("eval_split"),
           "differs": [{"key": k, "label": LABELS.get(k, k),
                        "values": {n: _setting(firsts[n].get(k), k, firsts[n]) for n in names}} for k in differ],
           "groups": [], "comparisons": []}
    for g in groups:
        pc = np.mean([[c["accuracy"] for c in r.metrics["test"]["per_class"]] for r in g.runs], axis=0)
        out["groups"].append({"name": g.name, "seeds": [r.seed for r in g.runs], "dirs": [str(r.dir) for r in g.runs],
                              "stats": {k: S.describe(_values(g, k)) for k, _ in METRICS},
                              "per_class_acc": pc.tolist()})
    tests = [(g, test_pair(bg, g)) for g in groups if g.name != base]
    valid = [t for _, t in tests if t["test"]]
    for t, adj in zip(valid, S.holm([t["p"] for t in valid])):
        t["p_holm"] = float(adj)
        t["significant"] = bool(adj < ALPHA)
    gstats = {d["name"]: d for d in out["groups"]}
    for g, t in tests:
        diff = 100 * (gstats[g.name]["stats"]["test_acc"]["mean"] - gstats[base]["stats"]["test_acc"]["mean"])
        pa, pb = np.array(gstats[g.name]["per_class_acc"]), np.array(gstats[base]["per_class_acc"])
        pcd = (pa - pb) * 100 if pa.shape == pb.shape else np.array([])  # other classes: nothing to set side by side
        out["comparisons"].append({"name": g.name, "diff_points": diff, "per_class_diff_points": pcd.tolist(),
                                   **t, "text": sentence(g.name, base, diff, t, len(valid), gstats)})
    return out


def fmt_p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else "p = 1" if p > 0.995 else f"p = {p:.2f}" if p >= 0.095 else f"p = {p:.2g}"


def sentence(name: str, base: str, diff: float, t: dict, m: int, gstats: dict) -> dict:
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
        detail = f"Exact McNemar test on the {t['n']:,} shared test images{seed}: " + (
            f"{n_diff:,} are classified right by one model only, {t['only_variation']:,} by {name} and "
            f"{t['only_baseline']:,} by {base}." if n_diff else "both get exactly the same images right.")
    elif t["test"] == "paired_t":
        detail = f"Paired t-test of test accuracy over {t['n']} seeds (t = {t['statistic']:.2f}, {t['n'] - 1} df)."
    else:
        detail = (f"Welch's t-test of test accuracy over {t['n'][0]} and {t['n'][1]} seeds "
                  f"(unpaired: the seeds differ; t = {t['statistic']:.2f}).")
    if m > 1:
        detail += f" Holm-corrected for the {m} comparisons against {base} (uncorrected {fmt_p(t['p'])})."
    if t["test"] == "mcnemar":  # one trained model each: training's own seed-to-seed spread is not in the test
        detail += (" This compares these two trained models; another seed can move either by a few tenths of a "
                   "point, so for a claim about the setting itself add `repeats: 3` or more (a t-test over seeds).")
    return {"head": head, "detail": detail}


# ----------------------------------------------------------------------------------------------
# Figures (the look of plots.py)


def fig_curves(groups: list[Group]):
    """Train (dashed) and val (solid) loss and accuracy per epoch, one colour per group; mean over seeds with
    the seeds' min-max band."""
    from matplotlib.ticker import MaxNLocator

    plt = P().plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.9), constrained_layout=True)
    for i, g in enumerate(groups):
        for ax, what, scale in ((axes[0], "loss", 1.0), (axes[1], "acc", 100.0)):
            for split, ls in (("train", "--"), ("val", "-")):
                runs = [r.history for r in g.runs if r.history.get(f"{split}_{what}")]
                if not runs:
                    continue
                ys = np.full((len(runs), max(len(h["epoch"]) for h in runs)), np.nan)  # (seeds, epochs)
                for j, h in enumerate(runs):
                    ys[j, :len(h["epoch"])] = np.asarray(h[f"{split}_{what}"]) * scale
                ep = np.arange(1, ys.shape[1] + 1)
                ax.plot(ep, np.nanmean(ys, 0), ls=ls, color=_colour(i), lw=1.9 if split == "val" else 1.3,
                        marker="o" if split == "val" else None, ms=3,
                        label=g.name if split == "val" and what == "loss" else None)
                if len(runs) > 1 and split == "val":
                    ax.fill_between(ep, np.nanmin(ys, 0), np.nanmax(ys, 0), color=_colour(i), alpha=0.15, lw=0)
            ax.set(xlabel="epoch", title="Loss" if what == "loss" else "Accuracy (%)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].plot([], [], "k-", label="validation")
    axes[0].plot([], [], "k--", label="training")
    fig.legend(loc="outside right upper", fontsize=8)
    return fig


def fig_accuracy(res: dict, groups: list[Group]):
    """Test accuracy per group: each seed (grey), the mean (diamond), its 95% t-interval over seeds, or for a
    single run the Wilson interval over the test images."""
    fig, ax = P().plt.subplots(figsize=(7.5, 0.45 * len(groups) + 1.2), constrained_layout=True)
    for i, (g, st) in enumerate(zip(groups, res["groups"])):
        y, s, n = len(groups) - 1 - i, st["stats"]["test_acc"], g.runs[0].metrics["test"]["n"]
        ax.scatter(np.array(_values(g, "test_acc")) * 100, [y] * len(g.runs), s=14, color="#94a3b8", zorder=2)
        lo, hi = (s["lo"], s["hi"]) if s["n"] > 1 else S.proportion_ci(round(s["mean"] * n), n)
        ax.errorbar(s["mean"] * 100, y, xerr=[[100 * (s["mean"] - lo)], [100 * (hi - s["mean"])]],
                    fmt="none", ecolor=_colour(i), elinewidth=2, capsize=4, zorder=3)
        ax.plot(s["mean"] * 100, y, "D", color=_colour(i), ms=7, zorder=4)
        if g.name == res["baseline"]:
            ax.axvline(s["mean"] * 100, color=P().INK, ls=":", lw=1)
    ax.set_yticks(range(len(groups)), [g.name for g in groups][::-1])
    ax.set(xlabel=f"{res['eval_split'] or 'test'} accuracy (%)", title="Test accuracy per variation")
    ax.margins(x=0.25, y=0.2)
    return fig


def fig_per_class(res: dict):
    """Heat map of per-class accuracy differences against the baseline (points), or None."""
    comps = [c for c in res["comparisons"] if len(c["per_class_diff_points"]) == len(res["classes"])]
    if not comps:
        return None
    d = np.array([c["per_class_diff_points"] for c in comps])  # (variations, classes)
    k, lim = d.shape[1], max(0.5, float(np.nanmax(np.abs(d))))
    fig, ax = P().plt.subplots(figsize=(max(6.5, min(0.75 * k + 2.5, 24)), 0.55 * len(comps) + 1.9),
                               constrained_layout=True)
    im = ax.imshow(d, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    base_acc = next(g["per_class_acc"] for g in res["groups"] if g["name"] == res["baseline"])
    ticks = [f"{c}\n{100 * a:.0f}%" for c, a in zip(res["classes"], base_acc)] if k <= 20 else res["classes"]
    ax.set_xticks(range(k), ticks, fontsize=8 if k <= 20 else 6, rotation=0 if k <= 12 else 90)
    ax.set_yticks(range(len(comps)), [c["name"] for c in comps])
    ax.grid(False)
    if k * len(comps) <= 400:
        for (r, j), v in np.ndenumerate(d):
            ax.text(j, r, f"{v:+.1f}", ha="center", va="center", fontsize=8,
                    color="white" if abs(v) > 0.6 * lim else P().INK)
    fig.colorbar(im, ax=ax, label="points", shrink=0.9)
    ax.set_title(f"Per-class test accuracy against {res['baseline']} (percentage points; "
                 f"{res['baseline']}'s own accuracy under each class)")
    return fig


def P():
    """plots.py: its style (rcParams), colours and `save` (imported late: matplotlib is slow to load)."""
    from cnnlab.report import plots

    return plots


def _colour(i: int):
    return P().plt.get_cmap("tab10").colors[i % 10]


def figures(res: dict, groups: list[Group], out: Path) -> dict[str, Path]:
    figs = {"curves": fig_curves(groups), "accuracy": fig_accuracy(res, groups), "per_class": fig_per_class(res)}
    return {k: P().save(f, out / f"study_{k}.png") for k, f in figs.items() if f is not None}


# ----------------------------------------------------------------------------------------------
# Tables and pages


def _cell(key: str, s: dict) -> tuple[str, str]:
    """(mean ± std, [95% interval]) as people write them; one run gives just the value."""
    if s["n"] == 0 or s["mean"] is None or not math.isfinite(s["mean"]):
        return "–", ""
    f = {"best_epoch": lambda x: f"{x:.1f}", "best_val_acc": lambda x: f"{100 * x:.2f}",
         "test_acc": lambda x: f"{100 * x:.2f}", "test_loss": lambda x: f"{x:.4f}", "params": lambda x: f"{x:,.0f}",
         "train_seconds": lambda x: f"{x:.1f}"}[key]
    unit = {"best_val_acc": "%", "test_acc": "%", "train_seconds": " s"}.get(key, "")
    if s["n"] == 1 or (key == "params" and s["std"] == 0):
        return (f"{s['mean']:.0f}" if key == "best_epoch" else f(s["mean"])) + unit, ""
    hi = min(s["hi"], 1.0) if key.endswith("acc") else s["hi"]  # shown within what the quantity can be
    return f"{f(s['mean'])} ± {f(s['std'])}{unit}", f"[{f(max(s['lo'], 0.0))}, {f(hi)}]"


def tables(res: dict) -> tuple[list, list, list, list]:
    names = [g["name"] for g in res["groups"]]
    dhead = ["setting"] + names
    drows = [[d["label"] + ("" if d["label"] == d["key"] else f" ({d['key']})")] + [d["values"][n] for n in names]
             for d in res["differs"]]
    rhead = ["variation", "seeds"] + [label for _, label in METRICS]
    rrows = [[g["name"], str(len(g["seeds"]))] + [_cell(k, g["stats"][k]) for k, _ in METRICS] for g in res["groups"]]
    return dhead, drows, rhead, rrows


def markdown(res: dict, title: str, figs: dict, listing: list[dict], out: Path) -> str:
    def table(head, rows):
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows])

    dhead, drows, rhead, rrows = tables(res)
    lines = [f"# {title}", "", f"{res['setup']}. Baseline: **{res['baseline']}**; significance level "
             f"{res['alpha']}.", ""]
    lines += [f"- **{c['text']['head']}.** {c['text']['detail']}" for c in res["comparisons"]]
    lines += ["", "## What differs", "", table(dhead, drows) if drows else "Nothing: the runs share one config.",
              "", "## Results", "", "Mean ± std over seeds, [95% t-interval]." if any(len(g["seeds"]) > 1 for g in
                                                                               res["groups"]) else "One run each.", "",
              table(rhead, [r[:2] + [" ".join(x for x in c if x) for c in r[2:]] for r in rrows]), ""]
    for key, cap in (("accuracy", "Test accuracy"), ("curves", "Training curves"), ("per_class", "Per-class accuracy")):
        if key in figs:
            lines += [f"![{cap}]({os.path.relpath(figs[key], out)})", ""]
    lines += ["## Runs", ""] + [f"- {r['variation']} seed {r.get('seed')}: {r.get('status')} — "
                                 f"`{os.path.relpath(r['dir'], out)}`" for r in listing]
    return "\n".join(lines) + "\n"


class _Raw(str):
    """HTML that the page's table must not escape."""


def _folder(d: str, out: Path) -> _Raw:
    from html import escape as e

    rel = os.path.relpath(d, out)
    has = (Path(d) / "report.html").is_file()
    return _Raw(f'<a href="{e(rel)}/report.html"><code>{e(rel)}</code></a>' if has else f"<code>{e(rel)}</code>")


def html_page(res: dict, title: str, figs: dict, listing: list[dict], out: Path) -> str:
    import base64
    from html import escape as e

    from cnnlab.report.html import CSS

    def td(c, bold):  # a cell: text, (value, note) or a _Raw piece of HTML
        inner = c if isinstance(c, _Raw) else e(c[0]) if isinstance(c, tuple) else e(str(c))
        note = f"<br><span class=note>{e(c[1])}</span>" if isinstance(c, tuple) and c[1] else ""
        return f"<td>{'<b>' * bold}{inner}{'</b>' * bold}{note}</td>"

    def table(head, rows):
        th = "".join(f"<th>{e(h)}</th>" for h in head)
        trs = "".join("<tr>" + "".join(td(c, j == 0) for j, c in enumerate(r)) + "</tr>" for r in rows)
        return (f'<div class="card" style="overflow-x:auto"><table><thead><tr>{th}</tr></thead>'
                f"<tbody>{trs}</tbody></table></div>")

    def img(key, caption):
        if key not in figs:
            return ""
        data = base64.b64encode(Path(figs[key]).read_bytes()).decode("ascii")
        return (f'<div class="card"><figure><img src="data:image/png;base64,{data}" alt="{e(caption)}">'
                f"<figcaption>{caption}</figcaption></figure></div>")

    dhead, drows, rhead, rrows = tables(res)
    verdicts = "".join(
        f'<div class="finding" style="--c:{"#16a34a" if c.get("significant") else "#64748b"}">'
        f'<span class="sev">{"significant" if c.get("significant") else "not significant" if c["test"] else "untested"}'
        f'</span><h3>{e(c["text"]["head"])}</h3><p>{e(c["text"]["detail"])}</p></div>' for c in res["comparisons"])
    n_seeds = max(len(g["seeds"]) for g in res["groups"])
    sections = [
        ("verdict", "Against the baseline", f"Each variation against <b>{e(res['baseline'])}</b> on test accuracy; "
         f"significant means p &lt; {res['alpha']} after correction.", verdicts or "<p>Only one variation.</p>"),
        ("differs", "What differs", "One row per setting that is not the same in every variation.",
         table(dhead, drows) if drows else "<p>Nothing: the runs share one config.</p>"),
        ("results", "Results", ("Mean ± std over seeds with the 95% t-interval below." if n_seeds > 1 else
                                "One run per variation.") + " Train time is wall time of one run on its machine.",
         table(rhead, rrows) + img("accuracy", "Test accuracy of each seed (grey), the mean (diamond) and its 95% "
                                   "t-interval over the seeds." if n_seeds > 1 else "Test accuracy with its 95% Wilson "
                                   "interval over the test images. Overlapping intervals do not rule out a real "
                                   "difference: the McNemar test above pairs the two models image by image.")),
        ("curves", "Curves", "Validation solid, training dashed; one colour per variation"
         + ("; the band spans the seeds." if n_seeds > 1 else "."), img("curves", "Loss and accuracy per epoch.")),
        ("classes", "Per class", "Where each variation gains or loses against the baseline.",
         img("per_class", "Blue: better than the baseline on that class; red: worse.")),
        ("runs", "Runs", "The run folders behind these numbers.", table(["variation", "seed", "status", "folder"], [
            [r["variation"], r.get("seed"), r.get("status"), _folder(r["dir"], out)] for r in listing]))]
    seeds = ", ".join(map(str, res["groups"][0]["seeds"])) if n_seeds > 1 else ""
    nav = "".join(f'<a href="#{s}">{e(t)}</a>' for s, t, _, c in sections if c)
    body = "".join(f'<section id="{s}"><h2>{e(t)}</h2><p class="lead">{lead}</p>{c}</section>'
                   for s, t, lead, c in sections if c)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{e(title)} · cnnlab study</title>'
            f'<style>{CSS}</style></head><body><div class="layout"><nav><div class="brand">cnn<span>lab</span></div>'
            f'<div class="run">{e(title)}</div>{nav}</nav><main><header class="hero" id="top">'
            f'<div class="eyebrow">cnnlab study</div><h1>{e(title)}</h1><p class="sub"><b>{e(res["setup"])}</b> · '
            f'{len(res["groups"])} variations, {sum(len(g["seeds"]) for g in res["groups"])} runs'
            f'{f" (seeds {seeds})" if seeds else ""}, baseline <b>{e(res["baseline"])}</b>.</p></header>'
            f'{body}<footer>Drawn from the saved run folders by <code>cnnlab compare</code>; nothing was retrained.'
            f'</footer></main></div></body></html>\n')


def _plain(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    return o


def default_out(paths: list[Path]) -> Path:
    """Beside the runs, not in the working directory: runs/a + runs/b -> runs/comparison-a-vs-b."""
    import os

    parents = [p.resolve().parent for p in paths]
    base = Path(os.path.commonpath(parents))
    try:
        base = base.relative_to(Path.cwd())
    except ValueError:
        pass
    name = "comparison-" + "-vs-".join(p.resolve().name for p in paths)
    return base / (name if len(name) <= 80 else name[:80].rstrip("-"))


def compare(paths, *, out: str | Path | None = None, baseline: str | None = None, say=None) -> Path:
    """Compare run/study folders; writes comparison.json, study.html, study.md and the PNGs under `out`."""
    paths = [Path(p) for p in paths]
    groups, study_base, listing = load_groups(paths)
    if not groups:
        raise FileNotFoundError(f"no finished runs in {', '.join(map(str, paths))}")
    one_study = len(paths) == 1 and (paths[0] / "study.json").is_file()
    out = Path(out) if out else paths[0] if one_study else default_out(paths)
    out.mkdir(parents=True, exist_ok=True)
    res = analyze(groups, baseline or study_base)
    title = paths[0].name if one_study else "comparison"
    from cnnlab.training.experiment import write_json

    write_json(out / "comparison.json", _plain(res))
    figs = figures(res, groups, out / "plots")
    (out / "study.md").write_text(markdown(res, title, figs, listing, out))
    (out / "study.html").write_text(html_page(res, title, figs, listing, out))
    if say:
        for c in res["comparisons"]:
            say(c["text"]["head"])
    return out / "study.html"
