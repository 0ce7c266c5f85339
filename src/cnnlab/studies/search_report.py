"""The pages of a hyperparameter search (studies/search.py): the trials table sorted by the objective (pruned
and failed trials marked), the objective against the trial number, Optuna's parameter importances, a slice
plot per parameter and the per-epoch objective of every trial (where the pruner stopped each), as static
PNGs in the look of report/plots.py; search.md and a self-contained search.html, drawn from search.json.

Imports rundir, studies.compare (formatting), report.plots / report.html (style) inside functions."""
from __future__ import annotations

import base64
import os
from html import escape as e
from pathlib import Path


from cnnlab import rundir as R
from cnnlab.studies.compare import fmt_value

STATE_STYLE = {"complete": ("o", None), "pruned": ("x", "#94a3b8"), "failed": ("s", "#dc2626")}


def _P():
    from cnnlab.report import plots

    return plots


def _scored(summary: dict) -> list[dict]:
    return [t for t in summary["trials"] if t["value"] is not None and t["state"] in ("complete", "pruned")]


def fig_history(summary: dict):
    """The objective of every trial against its number; pruned trials as grey crosses; the best so far."""
    P = _P()
    fig, ax = P.plt.subplots(figsize=(7.5, 3.4), constrained_layout=True)
    for state, (marker, colour) in STATE_STYLE.items():
        ts = [t for t in _scored(summary) if t["state"] == state]
        if ts:
            ax.scatter([t["number"] for t in ts], [t["value"] for t in ts], marker=marker, s=28,
                       color=colour or P.TRAIN, label=state, zorder=3)
    done = sorted((t for t in summary["trials"] if t["state"] == "complete" and t["value"] is not None),
                  key=lambda t: t["number"])
    if done:
        pick = max if summary["direction"] == "maximize" else min
        best = [pick(t["value"] for t in done[: i + 1]) for i in range(len(done))]
        ax.step([t["number"] for t in done], best, where="post", color=P.BEST, lw=1.6, label="best so far")
    ax.set(xlabel="trial", ylabel=summary["objective"], title=f"{summary['objective']} of each trial")
    ax.legend(fontsize=8)
    return fig


def fig_importances(summary: dict):
    imp = summary.get("importances") or {}
    if not imp:
        return None
    P = _P()
    keys = sorted(imp, key=imp.get)
    fig, ax = P.plt.subplots(figsize=(7.5, 0.45 * len(keys) + 1.2), constrained_layout=True)
    ax.barh(range(len(keys)), [imp[k] for k in keys], color=P.TRAIN)
    ax.set_yticks(range(len(keys)), keys)
    ax.set(xlabel="importance (fANOVA, share of the objective's variance)", title="Parameter importances")
    return fig


def fig_slices(summary: dict):
    """One panel per parameter: the objective against the value tried (log axis for log-uniform ranges)."""
    keys = list(summary["space"])
    ts = _scored(summary)
    if not keys or not ts:
        return None
    P = _P()
    n = len(keys)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = P.plt.subplots(rows, cols, figsize=(3.6 * cols + 0.6, 2.9 * rows), constrained_layout=True,
                               squeeze=False, sharey=True)
    for ax, key in zip(axes.flat, keys):
        spec = summary["space"][key]
        spec = {"categorical": spec} if isinstance(spec, list) else spec
        cats = spec.get("categorical")
        for state, (marker, colour) in STATE_STYLE.items():
            sel = [t for t in ts if t["state"] == state and key in t["params"]]
            if not sel:
                continue
            x = [cats.index(t["params"][key]) if cats is not None else t["params"][key] for t in sel]
            ax.scatter(x, [t["value"] for t in sel], marker=marker, s=24, color=colour or P.TRAIN, zorder=3,
                       label=state)
        if cats is not None:
            ax.set_xticks(range(len(cats)), [fmt_value(c) for c in cats])
            ax.set_xlim(-0.5, len(cats) - 0.5)
        elif "loguniform" in spec or spec.get("log"):
            ax.set_xscale("log")
        ax.set(xlabel=key)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    axes[0][0].set_ylabel(summary["objective"])
    axes[0][0].legend(fontsize=7)
    fig.suptitle("The objective against each parameter", fontweight="bold", fontsize=10)
    return fig


def fig_epochs(summary: dict):
    """The per-epoch objective of every trial (what the pruner saw); pruned trials grey, ending in a cross."""
    ts = [t for t in summary["trials"] if t["intermediate"]]
    if not ts:
        return None
    P = _P()
    fig, ax = P.plt.subplots(figsize=(7.5, 3.4), constrained_layout=True)
    for t in ts:
        ep = [int(k) for k in t["intermediate"]]
        v = list(t["intermediate"].values())
        pruned = t["state"] == "pruned"
        ax.plot(ep, v, color="#94a3b8" if pruned else P.TRAIN, lw=1.0 if pruned else 1.4, alpha=0.8,
                marker="o", ms=2.5)
        if pruned:
            ax.plot(ep[-1], v[-1], "x", color=P.BAD, ms=7, zorder=4)
    ax.plot([], [], color=P.TRAIN, label="completed")
    ax.plot([], [], color="#94a3b8", label="pruned (x: where)")
    ax.set(xlabel="epoch", ylabel=summary["objective"], title=f"{summary['objective']} per epoch, every trial")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    return fig


def figures(summary: dict, out: Path) -> dict[str, Path]:
    figs = {"history": fig_history(summary), "importances": fig_importances(summary),
            "slices": fig_slices(summary), "epochs": fig_epochs(summary)}
    return {k: _P().save(f, out / f"search_{k}.png") for k, f in figs.items() if f is not None}


CAPTIONS = {
    "history": "Each trial's objective (at its best epoch) by trial number; grey crosses: pruned trials (at the "
               "epoch they were stopped); the line: the best completed trial so far.",
    "importances": "How much of the objective's variation each parameter explains (Optuna's fANOVA over the "
                   "completed trials).",
    "slices": "The objective against the value each trial used; grey crosses: pruned trials.",
    "epochs": "The objective after every epoch, as reported to the pruner; a red cross marks where a trial was "
              "pruned.",
}


def table(summary: dict) -> tuple[list[str], list[list]]:
    """The trials table, best first (scored trials by objective, then the rest by number)."""
    keys = list(summary["space"])
    sign = -1 if summary["direction"] == "maximize" else 1
    rows = sorted(summary["trials"], key=lambda t: (t["value"] is None, sign * (t["value"] or 0), t["number"]))
    best = (summary.get("best") or {}).get("name")
    head = ["rank", "trial", "state", summary["objective"], "epochs", *keys, "train time"]
    body = [[str(i + 1), t["name"] + (" (best)" if t["name"] == best else ""),
             t["state"] + (f" at epoch {t['pruned_at']}" if t["state"] == "pruned" and t["pruned_at"] else ""),
             "–" if t["value"] is None else f"{t['value']:.4f}", str(t["epochs"] or "–"),
             *[fmt_value(t["params"][k]) if k in t["params"] else "–" for k in keys],
             "–" if t["seconds"] is None else f"{t['seconds']:.1f} s"] for i, t in enumerate(rows)]
    return head, body


def _lead(summary: dict) -> str:
    n = {s: sum(t["state"] == s for t in summary["trials"]) for s in ("complete", "pruned", "failed")}
    b = summary.get("best")
    text = (f"{len(summary['trials'])} of {summary['trials_planned']} trials: {n['complete']} completed, "
            f"{n['pruned']} pruned, {n['failed']} failed; {summary['sampler']} sampler, {summary['pruner']} pruner, "
            f"{summary['direction']} {summary['objective']}.")
    if b:
        text += (f" Best: {b['name']}, {summary['objective']} {b['value']:.4f}, with "
                 f"{', '.join(f'{k}={fmt_value(v)}' for k, v in b['params'].items())}; {R.BEST_YAML} holds it as a "
                 "ready config.")
    return text


def markdown(summary: dict, figs: dict, out: Path) -> str:
    head, body = table(summary)
    lines = [f"# Search: {summary['name']}", "", _lead(summary), "",
             f"Train the best settings: `cnnlab train {out / R.BEST_YAML}`." if summary.get("best") else "", "",
             "## Trials", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]
    for key, f in figs.items():
        lines += ["", f"![{key}]({os.path.relpath(f, out)})", "", f"*{CAPTIONS[key]}*"]
    return "\n".join(lines) + "\n"


def html_page(summary: dict, figs: dict, out: Path) -> str:
    from cnnlab.report.html import CSS

    head, body = table(summary)
    th = "".join(f"<th>{e(h)}</th>" for h in head)

    def cell(j, c, name):
        if j == 1 and (out / name / R.REPORT_HTML).is_file():
            return f'<td><a href="{e(name)}/{R.REPORT_HTML}">{e(c)}</a></td>'
        return f"<td>{e(c)}</td>"

    rows = "".join(
        f'<tr style="{"color:#94a3b8" if r[2].startswith(("pruned", "failed")) else ""}">'
        + "".join(cell(j, c, r[1].split(" ")[0]) for j, c in enumerate(r)) + "</tr>" for r in body)
    imgs = "".join(
        f'<div class="card"><figure><img src="data:image/png;base64,{base64.b64encode(Path(f).read_bytes()).decode()}"'
        f' alt="{e(k)}"><figcaption>{e(CAPTIONS[k])}</figcaption></figure></div>' for k, f in figs.items())
    best = (f'<p>Train the best settings: <code>cnnlab train {e(str(out / R.BEST_YAML))}</code></p>'
            if summary.get("best") else "")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{e(summary["name"])} · cnnlab '
            f'search</title><style>{CSS}</style></head><body><div class="layout"><nav><div class="brand">cnn<span>'
            f'lab</span></div><div class="run">{e(summary["name"])}</div><a href="#trials">Trials</a>'
            f'<a href="#figures">Figures</a></nav><main><header class="hero" id="top"><div class="eyebrow">cnnlab '
            f'search</div><h1>{e(summary["name"])}</h1><p class="sub">{e(_lead(summary))}</p>{best}</header>'
            f'<section id="trials"><h2>Trials</h2><p class="lead">Best first; pruned and failed trials greyed.</p>'
            f'<div class="card" style="overflow-x:auto"><table><thead><tr>{th}</tr></thead><tbody>{rows}</tbody>'
            f'</table></div></section><section id="figures"><h2>Figures</h2>{imgs}</section>'
            f'<footer>Drawn from {R.SEARCH_JSON} and the trials\' run folders; nothing was retrained.</footer>'
            f'</main></div></body></html>\n')


def write(root: Path, summary: dict | None = None) -> Path:
    """search.md, search.html and plots/search_*.png in the study folder; returns search.html."""
    summary = summary or R.read_json(root / R.SEARCH_JSON)
    figs = figures(summary, root / R.PLOTS)
    R.write_text(root / R.SEARCH_MD, markdown(summary, figs, root))
    R.write_text(root / R.SEARCH_HTML, html_page(summary, figs, root))
    return root / R.SEARCH_HTML

