"""The results of a hyperparameter search (studies/search.py): search.json, search.csv (the trials table),
best.yaml, study.json (for `cnnlab compare`); and its pages: the trials table sorted by the objective (pruned
and failed trials marked), the objective against the trial number, Optuna's parameter importances, a slice
plot per parameter and the per-epoch objective of every trial (where the pruner stopped each), as static
PNGs in the look of report/plots.py; search.md and a self-contained search.html, drawn from search.json.

Imports config, rundir, studies.search (names, the objective), studies.compare (formatting); report.plots /
report.html (style) and optuna inside functions."""
from __future__ import annotations

import base64
import os
import warnings
from html import escape as e
from pathlib import Path

from cnnlab import config as C
from cnnlab import rundir as R
from cnnlab.studies import search as SE
from cnnlab.studies.compare import fmt_value

# ----------------------------------------------------------------------------------------------
# Results: search.json, search.csv, best.yaml, study.json (drawn by the pages below)


def write_results(root: Path, cfg: C.Config, s: C.SearchConfig, study, config_path, overrides) -> dict:
    rows = []
    for t in study.get_trials(deepcopy=False):
        name, state = SE.TRIAL.format(t.number), SE.STATES.get(t.state.name, t.state.name.lower())
        path = root / name
        m = R.read_json(path / R.METRICS) if (path / R.METRICS).is_file() else None
        env = R.read_json(path / R.ENV) if (path / R.ENV).is_file() else None
        rows.append({"number": t.number, "name": name, "state": state, "params": dict(t.params),
                     "value": SE.objective_of(path, s) if m else None, "epochs": (m or {}).get("epochs_run"),
                     "pruned_at": t.last_step if state == "pruned" else None,
                     "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
                     "seconds": (env or {}).get("train_seconds"), "dir": name})
    sign = -1 if SE.direction(s) == "maximize" else 1
    done = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    best = min(done, key=lambda r: (sign * r["value"], r["number"])) if done else None
    summary = {"name": root.name, "objective": s.objective, "direction": SE.direction(s), "sampler": s.sampler,
               "pruner": s.pruner, "trials_planned": SE.total_trials(s), "space": s.space,
               "best": best and {k: best[k] for k in ("number", "name", "value", "params")},
               "importances": importances(study), "trials": rows}
    R.write_json(root / R.SEARCH_JSON, summary)
    ordered = sorted(rows, key=lambda r: (r["value"] is None, sign * (r["value"] or 0), r["number"]))
    keys = list(s.space)
    R.write_csv(root / R.SEARCH_CSV, ["rank", "trial", "state", s.objective, "epochs", *keys, "seconds"],
                [[i + 1, r["name"], r["state"], "" if r["value"] is None else repr(r["value"]), r["epochs"] or "",
                  *[fmt_value(r["params"].get(k)) if k in r["params"] else "" for k in keys],
                  "" if r["seconds"] is None else f"{r['seconds']:.1f}"] for i, r in enumerate(ordered)])
    if best:
        tree = SE.base_tree(cfg)
        best_cfg = C.load(tree, {**best["params"], "output.name": f"{root.name}-best"})
        R.write_text(root / R.BEST_YAML, f"# the best trial of {root} ({best['name']}, {s.objective} "
                                         f"{best['value']:.4f}); `cnnlab train {root / R.BEST_YAML}` runs it\n"
                     + C.dump_yaml(best_cfg))
    _write_manifest(root, cfg, rows, best, config_path, overrides)
    return summary


def importances(study) -> dict:
    """Optuna's parameter importances (fANOVA) over the complete trials; {} when they cannot say."""
    optuna = SE._optuna()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError, ZeroDivisionError):
        return {}


def _write_manifest(root: Path, cfg: C.Config, rows: list, best, config_path, overrides) -> None:
    """study.json with one variation per trial, so `cnnlab compare` reads a search like any study."""
    variations = [{"name": r["name"], "overrides": r["params"], "config": None,
                   "runs": [{"seed": cfg.train.seed, "dir": r["name"],
                             "status": "done" if (root / r["name"] / R.METRICS).is_file() else r["state"]}]}
                  for r in rows]
    R.write_json(root / R.STUDY_JSON, {
        "name": root.name, "baseline": best["name"] if best else None, "repeats": 1, "seeds": [cfg.train.seed],
        "grid": {}, "search": True, "source": {"config": str(config_path) if config_path else None,
                                               "overrides": list(overrides or [])},
        "complete": all(r["state"] in ("complete", "pruned") for r in rows), "variations": variations})


# ----------------------------------------------------------------------------------------------
# Figures and pages


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


def _repeats(summary: dict) -> str:
    rep = summary.get("repeats")
    if not rep or not rep.get("head"):
        return ""
    return (f"Over {rep['seeds']} seeds, the best settings against the config's own (baseline): {rep['head']}. "
            f"{rep.get('detail', '')} The runs and their report: {rep['dir']}/{R.COMPARISON_HTML}.")


def markdown(summary: dict, figs: dict, out: Path) -> str:
    head, body = table(summary)
    lines = [f"# Search: {summary['name']}", "", _lead(summary), "", _repeats(summary), "",
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
            f'search</div><h1>{e(summary["name"])}</h1><p class="sub">{e(_lead(summary))}</p>{best}'
            f'{f"<p>{e(_repeats(summary))}</p>" if _repeats(summary) else ""}</header>'
            f'<section id="trials"><h2>Trials</h2><p class="lead">Best first; pruned and failed trials greyed; click a heading to sort by it.</p>'
            f'<div class="card" style="overflow-x:auto"><table><thead><tr>{th}</tr></thead><tbody>{rows}</tbody>'
            f'</table></div></section><section id="figures"><h2>Figures</h2>{imgs}</section>'
            f'<footer>Drawn from {R.SEARCH_JSON} and the trials\' run folders; nothing was retrained.</footer>'
            f'</main></div><script>{SORT_JS}</script></body></html>\n')


# a click on a column's heading sorts the trials table by it (numbers as numbers; a second click reverses)
SORT_JS = """document.querySelectorAll('#trials th').forEach((th, i) => { th.style.cursor = 'pointer';
th.title = 'sort by this column'; th.onclick = () => { const body = th.closest('table').tBodies[0];
const key = r => { const t = r.cells[i].innerText.trim(), n = parseFloat(t); return isNaN(n) ? t : n; };
const rows = [...body.rows], dir = th.dataset.dir = th.dataset.dir === '1' ? '-1' : '1';
rows.sort((a, b) => { const x = key(a), y = key(b); return (x > y ? 1 : x < y ? -1 : 0) * dir; });
rows.forEach(r => body.appendChild(r)); }; });"""


def write(root: Path, summary: dict | None = None) -> Path:
    """search.md, search.html and plots/search_*.png in the study folder; returns search.html."""
    summary = summary or R.read_json(root / R.SEARCH_JSON)
    figs = figures(summary, root / R.PLOTS)
    R.write_text(root / R.SEARCH_MD, markdown(summary, figs, root))
    R.write_text(root / R.SEARCH_HTML, html_page(summary, figs, root))
    return root / R.SEARCH_HTML

