"""The pages of a comparison (`cnnlab compare`, a study's report): its figures (in plots.py's look),
tables, study.md and the self-contained study.html, drawn from studies/compare.py's results.

Imports: rundir, analysis.stats, report.plots / report.html (style); never studies.compare or study."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from cnnlab import rundir as R

METRICS = [("best_epoch", "best epoch"), ("best_val_acc", "best val acc"), ("test_acc", "test acc"),
           ("test_loss", "test loss"), ("params", "parameters"), ("train_seconds", "train time")]


# ----------------------------------------------------------------------------------------------
# Figures (the look of plots.py)


def fig_curves(groups, onsets: dict | None = None):
    """Train (dashed) and val (solid) loss and accuracy per epoch, one colour per group; mean over seeds with
    the seeds' min-max band; each single run's overfitting onset (`onsets`: name -> epoch) dotted on the loss.
    When every run has a single epoch, each variation is a marker (square: training, circle: validation) with
    its value, spread a little sideways so that they do not hide one another."""
    plt = P().plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.9), constrained_layout=True)
    n_ep = max((len(r.history_columns.get("epoch") or []) for g in groups for r in g.runs), default=0)
    one = n_ep == 1
    for i, g in enumerate(groups):
        shift = (i - (len(groups) - 1) / 2) * min(0.12, 0.8 / len(groups)) if one else 0.0
        for ax, what, scale in ((axes[0], "loss", 1.0), (axes[1], "acc", 100.0)):
            for split, ls in (("train", "--"), ("val", "-")):
                runs = [h for h in (r.history_columns for r in g.runs) if h.get(f"{split}_{what}")]
                if not runs:
                    continue
                ys = np.full((len(runs), max(len(h["epoch"]) for h in runs)), np.nan)  # (seeds, epochs)
                for j, h in enumerate(runs):
                    ys[j, :len(h["epoch"])] = np.asarray(h[f"{split}_{what}"]) * scale
                ep = np.arange(1, ys.shape[1] + 1) + shift
                y = np.nanmean(ys, 0)
                val = split == "val"
                ax.plot(ep, y, ls=ls, color=_colour(i), lw=1.9 if val else 1.3,
                        marker="o" if val else "s" if one else None, ms=7 if one else 3,
                        mfc=None if val else "white", label=g.name if val and what == "loss" else None)
                if one and np.isfinite(y[0]):
                    P().value_label(ax, ep[0], y[0], f"{y[0]:.3f}" if what == "loss" else f"{y[0]:.1f}%",
                                    _colour(i), left=not val)
                if len(runs) > 1 and val:
                    ax.fill_between(ep, np.nanmin(ys, 0), np.nanmax(ys, 0), color=_colour(i), alpha=0.15, lw=0)
            onset = (onsets or {}).get(g.name)
            if onset is not None and what == "loss":
                ax.axvline(onset, color=_colour(i), ls=":", lw=1.2)
            ax.set(xlabel="epoch", title="Loss" if what == "loss" else "Accuracy (%)")
    for ax in axes:
        P().epoch_axis(ax, np.arange(1, n_ep + 1))
    axes[0].plot([], [], "k-", marker="o" if one else None, label="validation")
    axes[0].plot([], [], "k--", marker="s" if one else None, mfc="white", label="training")
    if onsets and any(v is not None for v in onsets.values()):
        axes[0].plot([], [], "k:", label="overfitting onset")
    fig.legend(loc="outside right upper", fontsize=8)
    return fig


def fig_steps(groups):
    """Training loss (and batch accuracy, where logged) at every logged step (steps.csv, every
    `train.log_every` batches), all variations on one plot: the logged values faint, a centred moving average
    bold; a variation's seeds are averaged where they logged the same steps, else drawn one by one."""
    plt = P().plt
    logs = [[c for c in (R.columns(r.steps) for r in g.runs) if c.get("loss")] for g in groups]
    if not any(logs):
        return None
    whats = [("loss", 1.0)] + ([("acc", 100.0)] if any(c.get("acc") for cs in logs for c in cs) else [])
    fig, axes = plt.subplots(1, len(whats), figsize=(11 if len(whats) == 2 else 8, 3.9), constrained_layout=True,
                             squeeze=False)
    for ax, (what, scale) in zip(axes[0], whats):
        lo, hi = np.inf, -np.inf
        for i, (g, cs) in enumerate(zip(groups, logs)):
            cs = [c for c in cs if c.get(what)]
            if not cs:
                continue
            if all(c["step"] == cs[0]["step"] for c in cs):  # the seeds logged the same steps: their mean
                series = [(np.asarray(cs[0]["step"], float), np.nanmean([np.asarray(c[what], float) for c in cs], 0))]
            else:
                series = [(np.asarray(c["step"], float), np.asarray(c[what], float)) for c in cs]
            for j, (x, y) in enumerate(series):
                y = y * scale
                sm = P().moving_average(y)
                ax.plot(x, y, color=_colour(i), alpha=0.25 if sm is not None else 1.0, lw=0.8 if sm is not None
                        else 1.6, marker="o" if len(y) < 15 else None, ms=3,
                        label=g.name if sm is None and j == 0 and what == "loss" else None)
                if sm is not None:
                    ax.plot(x, sm[0], color=_colour(i), lw=1.8, label=g.name if j == 0 and what == "loss" else None)
                if np.isfinite(y).any():
                    lo, hi = min(lo, np.nanmin(y)), max(hi, np.nanmax(y))
        if what == "loss" and lo > 0 and hi / lo > 30:
            ax.set_yscale("log")
        ax.set(xlabel="step", title="Training loss per step" if what == "loss" else "Training accuracy per step "
               "(batch, %)")
    fig.legend(loc="outside right upper", fontsize=8)
    return fig


def fig_accuracy(res: dict, groups):
    """Test accuracy per group: each seed (grey), the mean (diamond), its 95% t-interval over seeds, or for a
    single run the Wilson interval over the test images (compare.analyze's "interval")."""
    fig, ax = P().plt.subplots(figsize=(7.5, 0.45 * len(groups) + 1.2), constrained_layout=True)
    for i, (g, st) in enumerate(zip(groups, res["groups"])):
        y, s = len(groups) - 1 - i, st["stats"]["test_acc"]
        ax.scatter(np.array([r.metrics["test"]["accuracy"] for r in g.runs]) * 100, [y] * len(g.runs), s=14, color="#94a3b8", zorder=2)
        lo, hi = st["interval"]
        ax.errorbar(s["mean"] * 100, y, xerr=[[100 * (s["mean"] - lo)], [100 * (hi - s["mean"])]],
                    fmt="none", ecolor=_colour(i), elinewidth=2, capsize=4, zorder=3)
        ax.plot(s["mean"] * 100, y, "D", color=_colour(i), ms=7, zorder=4)
        if g.name == res["baseline"]:
            ax.axvline(s["mean"] * 100, color=P().INK, ls=":", lw=1)
    ax.set_yticks(range(len(groups)), [g.name for g in groups][::-1])
    ax.set(xlabel=f"{split_word(res)} accuracy (%)", title=f"{split_word(res).capitalize()} accuracy per variation")
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
    ax.set_title(f"Per-class {split_word(res)} accuracy against {res['baseline']} (percentage points; "
                 f"{res['baseline']}'s own accuracy under each class)")
    return fig


def P():
    """plots.py: its style (rcParams), colours and `save` (imported late: matplotlib is slow to load)."""
    from cnnlab.report import plots

    return plots


def _colour(i: int):
    return P().plt.get_cmap("tab10").colors[i % 10]


def figures(res: dict, groups, out: Path) -> dict[str, Path]:
    """study_curves.png, study_steps.png, study_accuracy.png, study_per_class.png under `out` (those that can be
    drawn)."""
    onsets = {g["name"]: g["overfit_onset"][0] for g in res["groups"] if len(g["overfit_onset"]) == 1}
    figs = {"curves": fig_curves(groups, onsets), "steps": fig_steps(groups), "accuracy": fig_accuracy(res, groups),
            "per_class": fig_per_class(res)}
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


def split_word(res: dict) -> str:
    """What the accuracy column holds: "test", "val", or "evaluated" when the runs differ (see each row)."""
    return res.get("eval_split") or ("evaluated" if res.get("eval_splits") else "test")


def labels(res: dict) -> list[str]:
    """METRICS' column names, the accuracy and loss named for the split they were measured on."""
    w = split_word(res)
    return [{"test_acc": f"{w} acc", "test_loss": f"{w} loss"}.get(k, label) for k, label in METRICS]


ONSET = "overfitting from"  # the results table's column of overfitting onsets, after "best epoch"
ONSET_NOTE = ("Overfitting from: the epoch after which validation loss rose while training loss kept falling (the "
              "rule of the run report's diagnostics); not seen: no such epoch within the epochs run.")


def _onset_cell(onsets: list) -> tuple[str, str]:
    """Each seed's overfitting onset epoch ("not seen" where there is none)."""
    if all(o is None for o in onsets):
        return "not seen", ""
    if len(onsets) == 1:
        return f"epoch {onsets[0]}", ""
    return ", ".join("–" if o is None else str(o) for o in onsets), "per seed"


def tables(res: dict) -> tuple[list, list, list, list]:
    names = [g["name"] for g in res["groups"]]
    dhead = ["setting"] + names
    drows = [[d["label"] + ("" if d["label"] == d["key"] else f" ({d['key']})")] + [d["values"][n] for n in names]
             for d in res["differs"]]
    mixed = res.get("eval_splits") and not res.get("eval_split")
    rhead = ["variation", "seeds"] + ["evaluated on"] * bool(mixed) + labels(res)
    at = len(rhead) - len(METRICS) + 1 + [k for k, _ in METRICS].index("best_epoch")  # after "best epoch"
    rhead.insert(at, ONSET)
    rrows = []
    for g in res["groups"]:
        row = ([g["name"], str(len(g["seeds"]))] + [g.get("eval_split", "")] * bool(mixed)
               + [_cell(k, g["stats"][k]) for k, _ in METRICS])
        row.insert(at, _onset_cell(g.get("overfit_onset") or [None] * len(g["seeds"])))
        rrows.append(row)
    return dhead, drows, rhead, rrows


def terminal(res: dict) -> list[str]:
    """The comparison in a few lines for the terminal (`cnnlab compare`, the end of a study): each variation's
    accuracy with its 95% interval against the baseline's, and the verdict: better, worse, no real
    difference (at the corrected significance level) or not tested."""
    g = {x["name"]: x for x in res["groups"]}

    def acc(n):
        lo, hi = g[n]["interval"]
        return f"{100 * g[n]['stats']['test_acc']['mean']:.2f}% [{100 * lo:.1f}, {100 * hi:.1f}]"

    tests = {"mcnemar": "McNemar", "paired_t": "paired t", "welch_t": "Welch t"}
    base, w = res["baseline"], split_word(res)
    lines = [f"{res['setup']}; {w} accuracy with its 95% interval; baseline {base}: {acc(base)}"]
    if res.get("data_note"):
        lines.append(f"note: {res['data_note']}")
    width = max([len(c["name"]) for c in res["comparisons"]] or [0])
    for c in res["comparisons"]:
        how = (f" ({tests[c['test']]}, {fmt_p(c['p_holm'])}{', Holm' if len(res['comparisons']) > 1 else ''})"
               if c["test"] else f": {c['why']}")
        lines.append(f"  {c['name'] + ':':<{width + 1}} {acc(c['name'])}, {c['diff_points']:+.2f} points: "
                     f"{c['verdict']}{how}")
    return lines


def fmt_p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else "p = 1" if p > 0.995 else f"p = {p:.2f}" if p >= 0.095 else f"p = {p:.2g}"


def markdown(res: dict, title: str, figs: dict, listing: list[dict], out: Path) -> str:
    def table(head, rows):
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows])

    dhead, drows, rhead, rrows = tables(res)
    lines = [f"# {title}", "", f"{res['setup']}. Baseline: **{res['baseline']}**; significance level "
             f"{res['alpha']}.", ""]
    if res.get("data_note"):
        lines += [f"> **The data differ.** {res['data_note']}", ""]
    lines += [f"- **{c['text']['head']}.** {c['text']['detail']}" for c in res["comparisons"]]
    lines += ["", "## What differs", "", table(dhead, drows) if drows else "Nothing: the runs share one config.",
              "", "## Results", "", "Mean ± std over seeds, [95% t-interval]." if any(len(g["seeds"]) > 1 for g in
                                                                               res["groups"]) else "One run each.", "",
              table(rhead, [[" ".join(x for x in c if x) if isinstance(c, tuple) else c for c in r] for r in rrows]),
              "", ONSET_NOTE, ""]
    acc_cap = f"{split_word(res).capitalize()} accuracy"
    for key, cap in (("accuracy", acc_cap), ("curves", "Training curves"), ("steps", "Training loss per step"),
                     ("per_class", "Per-class accuracy")):
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
    has = (Path(d) / R.REPORT_HTML).is_file()
    return _Raw(f'<a href="{e(rel)}/{R.REPORT_HTML}"><code>{e(rel)}</code></a>' if has else f"<code>{e(rel)}</code>")


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
    colour = {"better": "#16a34a", "worse": "#dc2626"}
    verdicts = "".join(  # the verdict as the terminal prints it: better, worse, no real difference, not tested
        f'<div class="finding" style="--c:{colour.get(c.get("verdict"), "#64748b")}"><span class="sev">'
        f'{e(c.get("verdict") or ("significant" if c.get("significant") else "not significant"))}</span>'
        f'<h3>{e(c["text"]["head"])}</h3><p>{e(c["text"]["detail"])}</p></div>' for c in res["comparisons"])
    n_seeds, w = max(len(g["seeds"]) for g in res["groups"]), split_word(res).capitalize()
    note = (f'<div class="finding" style="--c:#d97706"><span class="sev">the data differ</span><h3>Not measured '
            f'on the same images</h3><p>{e(res["data_note"])}</p></div>' if res.get("data_note") else "")
    sections = [
        ("verdict", "Against the baseline", f"Each variation against <b>{e(res['baseline'])}</b> on "
         f"{split_word(res)} accuracy; significant means p &lt; {res['alpha']} after correction.",
         note + (verdicts or "<p>Only one variation.</p>")),
        ("differs", "What differs", "One row per setting that is not the same in every variation.",
         table(dhead, drows) if drows else "<p>Nothing: the runs share one config.</p>"),
        ("results", "Results", ("Mean ± std over seeds with the 95% t-interval below." if n_seeds > 1 else
                                "One run per variation.") + " Train time is wall time of one run on its machine. "
         + ONSET_NOTE,
         table(rhead, rrows) + img("accuracy", f"{w} accuracy of each seed (grey), the mean (diamond) and its 95% "
                                   "t-interval over the seeds." if n_seeds > 1 else f"{w} accuracy with its 95% Wilson "
                                   "interval over its images. Overlapping intervals do not rule out a real "
                                   "difference: the McNemar test above pairs the two models image by image.")),
        ("curves", "Curves", "Validation solid, training dashed; one colour per variation"
         + ("; the band spans the seeds" if n_seeds > 1 else "")
         + ("; dotted: where a variation starts to overfit." if any(
             len(g["overfit_onset"]) == 1 and g["overfit_onset"][0] for g in res["groups"]) else "."),
         img("curves", "Loss and accuracy per epoch.") + img(
             "steps", "Training loss and batch accuracy at every logged step (every <code>train.log_every</code> "
             "batches), all variations overlaid: faint the logged values, bold a centred moving average.")),
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


