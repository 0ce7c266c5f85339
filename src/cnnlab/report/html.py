"""Rendering for report.py: one self-contained HTML page (inline CSS, images as data URIs, no scripts).
The Markdown twin is in report_md.py; both draw on `facts` and `per_class_rows` here.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

CSS = """
:root{--ink:#0f172a;--ink2:#334155;--muted:#64748b;--line:#e2e8f0;--bg:#f6f7f9;--card:#fff;--accent:#2563eb;
--error:#dc2626;--warning:#d97706;--info:#2563eb;--ok:#16a34a}
*{box-sizing:border-box}
html{scroll-behavior:smooth}
body{margin:0;background:var(--bg);color:var(--ink);font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue","Liberation Sans","DejaVu Sans",Arial,sans-serif;-webkit-font-smoothing:antialiased}
.layout{display:grid;grid-template-columns:232px minmax(0,1fr);min-height:100vh}
nav{position:sticky;top:0;height:100vh;overflow-y:auto;background:#0f172a;color:#cbd5e1;padding:26px 16px 24px}
nav .brand{font-weight:800;letter-spacing:.02em;color:#fff;font-size:17px;padding:0 10px}
nav .brand span{color:#60a5fa}
nav .run{color:#94a3b8;font-size:12.5px;padding:2px 10px 18px;word-break:break-all}
nav a{display:flex;justify-content:space-between;align-items:center;color:#cbd5e1;text-decoration:none;
padding:6px 10px;border-radius:6px;font-size:14px}
nav a:hover{background:#1e293b;color:#fff}
nav .badge{font-size:11px;font-weight:700;border-radius:999px;padding:1px 7px;color:#fff}
main{padding:34px 44px 90px;max-width:1240px;width:100%}
header.hero{background:var(--card);border:1px solid var(--line);border-radius:14px;padding:26px 30px 22px;
box-shadow:0 1px 2px rgba(15,23,42,.04)}
.eyebrow{font-size:12px;font-weight:700;letter-spacing:.08em;text-transform:uppercase;color:var(--accent)}
h1{font-size:30px;line-height:1.2;margin:4px 0 6px;letter-spacing:-.01em}
.sub{color:var(--muted);margin:0 0 18px}
.sub b{color:var(--ink2);font-weight:600}
.stats{display:grid;grid-template-columns:repeat(4,minmax(0,1fr));gap:12px}
.stat{border:1px solid var(--line);border-radius:10px;padding:12px 14px;background:#fbfcfd}
.stat .k{font-size:11.5px;font-weight:600;letter-spacing:.05em;text-transform:uppercase;color:var(--muted)}
.stat .v{font-size:25px;font-weight:700;line-height:1.25;font-variant-numeric:tabular-nums}
.stat .s{font-size:12.5px;color:var(--muted)}
.stat.main{background:#eff6ff;border-color:#bfdbfe}.stat.main .v{color:#1d4ed8}
section{margin-top:38px}
h2{font-size:21px;margin:0 0 4px;letter-spacing:-.005em;padding-top:6px}
h2+.lead{color:var(--muted);margin:0 0 14px}
h3{font-size:16px;margin:18px 0 8px}
.finding{background:var(--card);border:1px solid var(--line);border-left:5px solid var(--c);border-radius:10px;
padding:13px 18px 12px;margin:0 0 10px}
.finding .sev{display:inline-block;font-size:11px;font-weight:800;letter-spacing:.07em;text-transform:uppercase;
color:#fff;background:var(--c);border-radius:4px;padding:1px 7px;margin-right:8px;vertical-align:2px}
.finding h3{display:inline;font-size:16.5px;margin:0}
.finding p{margin:6px 0 0;color:var(--ink2)}
.finding .next{color:var(--muted);font-size:14px}.finding .next b{color:var(--ink2)}
.card{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:18px 20px;margin:0 0 16px}
figure{margin:0}
figure img{display:block;max-width:100%;height:auto;margin:0 auto}
figcaption{color:var(--muted);font-size:13.5px;margin-top:10px}
figcaption b{color:var(--ink2)}
.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:16px;align-items:start;
margin-bottom:16px}
.grid2>.card{margin:0}.split{display:grid;grid-template-columns:repeat(auto-fit,minmax(540px,1fr));gap:16px}
table{border-collapse:collapse;width:100%;font-size:13.5px;font-variant-numeric:tabular-nums}
th{text-align:left;font-size:11.5px;letter-spacing:.05em;text-transform:uppercase;color:var(--muted);
font-weight:700;border-bottom:2px solid var(--line);padding:7px 10px;background:#fff;position:sticky;top:0;
white-space:nowrap}
td{border-bottom:1px solid #eef2f6;padding:6px 10px;vertical-align:top}
tbody tr:nth-child(even){background:#fafbfc}
td.n,th.n{text-align:right}td.n,td.b{white-space:nowrap}
tr.total td{font-weight:700;border-top:2px solid var(--line)}
.scroll{max-height:560px;overflow:auto;border:1px solid var(--line);border-radius:10px}
.bar{display:inline-block;width:72px;height:8px;background:#e2e8f0;border-radius:4px;margin-right:8px;
vertical-align:1px;overflow:hidden}
.bar i{display:block;height:100%;background:var(--accent)}
.bar.low i{background:var(--error)}
.tag{display:inline-block;font-size:11px;font-weight:700;color:#fff;background:var(--error);border-radius:4px;
padding:0 6px;margin-left:6px}
pre{background:#0f172a;color:#e2e8f0;border-radius:10px;padding:14px 16px;overflow:auto;font-size:12.5px;
line-height:1.5;margin:0;max-height:520px}
code,pre{font-family:"DejaVu Sans Mono","Liberation Mono",Menlo,Consolas,monospace}
dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:4px 18px;margin:0;font-size:14px}
dl.kv dt{color:var(--muted)}dl.kv dd{margin:0;word-break:break-word}
.note{color:var(--muted);font-size:13.5px;margin:6px 0}
footer{margin-top:50px;color:var(--muted);font-size:12.5px}
@media (max-width:900px){.layout{display:block}.stats{grid-template-columns:repeat(2,1fr)}.split{display:block}
nav{position:static;height:auto}main{padding:20px}}
@media print{nav{display:none}.layout{display:block}.scroll{max-height:none}}
"""
SEV_LABEL = {"error": "Problem", "warning": "Warning", "info": "Note", "ok": "OK"}
SEV_COLOUR = {"error": "#dc2626", "warning": "#d97706", "info": "#2563eb", "ok": "#16a34a"}

e = html.escape


def _pct(x) -> str:
    return "–" if x is None else f"{100 * float(x):.1f}%"


def _num(x, fmt: str = ".3f") -> str:
    return "–" if x is None else format(float(x), fmt)


def _duration(s) -> str:
    if s is None:
        return "–"
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def _table(head: list[str], rows: list[list], num: set[int] = frozenset(), cls: list[str] | None = None,
           nowrap: set[int] = frozenset()) -> str:
    """num: right-aligned number columns; nowrap: columns kept on one line; cls: a class per row."""
    def td(i, c):
        return f'<td class="n">{c}</td>' if i in num else f'<td class="b">{c}</td>' if i in nowrap else f"<td>{c}</td>"

    th = "".join(f'<th class="n">{h}</th>' if i in num else f"<th>{h}</th>" for i, h in enumerate(head))
    body = []
    for k, row in enumerate(rows):
        tds = "".join(td(i, c) for i, c in enumerate(row))
        body.append(f'<tr class="{cls[k]}">{tds}</tr>' if cls and cls[k] else f"<tr>{tds}</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{e(alt)}">'


def _fig(figs: dict, key: str) -> str:
    f = figs.get(key)
    if not f:
        return ""
    return (f'<div class="card"><figure>{_img(f["path"], f["title"])}<figcaption><b>{e(f["title"])}.</b> '
            f'{e(f["caption"])} <span class="note">(plots/{e(Path(f["path"]).name)})</span></figcaption></figure></div>')


# ----------------------------------------------------------------------------------------------
# Pieces shared by HTML and Markdown


def _seconds(run: dict) -> float | None:
    """Training time: metrics.json, else env.json's train_seconds, else the sum of history.csv's seconds."""
    for v in ((run["metrics"] or {}).get("seconds"), (run["env"] or {}).get("train_seconds")):
        if v is not None:
            return float(v)
    secs = [x for x in run["history"].get("seconds", []) if x == x]
    return float(sum(secs)) if secs else None


def _when(stamp) -> str | None:
    """'2026-11-22T04:42:00+0000' -> '2026-11-22 04:42 UTC' (anything unparsable is shown as it is)."""
    if not stamp:
        return None
    from datetime import datetime, timezone

    try:
        t = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return str(stamp)
    if t.tzinfo is not None and t.utcoffset().total_seconds() == 0:
        return t.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return t.strftime("%Y-%m-%d %H:%M") + (t.strftime(" %z") if t.tzinfo else "")


def facts(ctx: dict) -> dict:
    run = ctx["run"]
    m, d, s = run["metrics"] or {}, run["data"] or {}, run["summary"] or {}
    mod, env = run["model"] or {}, run["env"] or {}
    cfg = run["cfg"]
    split = m.get("eval_split") or d.get("eval_split") or "test"
    sizes = d.get("sizes") or {}
    return {
        "name": run["name"], "split": split,
        "data": d.get("name") or (cfg.data.name if cfg else "?"),
        "model": mod.get("name") or (cfg.model.name if cfg else None),
        "params": mod.get("total_params"), "trainable": mod.get("trainable_params"),
        "classes": len(run["classes"]),
        "input": f"{d.get('in_channels', '?')}×{d.get('input_size', '?')}×{d.get('input_size', '?')}",
        "sizes": " / ".join(f"{sizes[k]:,} {k}" for k in ("train", "val", "test") if sizes.get(k) is not None),
        "acc": s.get("accuracy"), "loss": s.get("loss"), "top5": s.get("top5"), "ece": s.get("ece"),
        "macro_f1": (s.get("macro") or {}).get("f1"), "best_val_acc": m.get("best_val_acc"),
        "best_epoch": m.get("best_epoch"), "epochs": m.get("epochs_run") or len(run["history"].get("epoch", [])),
        "stopped_early": m.get("stopped_early"), "seconds": _seconds(run),
        "device": env.get("device"), "started": _when(env.get("started")), "n_eval": s.get("n"),
    }


def per_class_rows(ctx: dict) -> list[dict]:
    s = ctx["run"]["summary"]
    cm = np.asarray(s["confusion"])
    names = [r["name"] for r in s["per_class"]]
    flagged = {f.data.get("class") for f in ctx["findings"] if f.kind in ("dead_class", "weak_class", "rare_class")}
    out = []
    for i, r in enumerate(s["per_class"]):
        row = cm[i].copy()
        row[i] = 0
        j = int(np.argmax(row))
        conf = f"'{names[j]}': {row[j]:,} ({_pct(row[j] / r['support'])})" if row[j] > 0 and r["support"] else "–"
        out.append({**r, "correct": int(cm[i, i]), "confused": conf, "flagged": r["name"] in flagged})
    return sorted(out, key=lambda r: (r["accuracy"], r["index"]))


# ----------------------------------------------------------------------------------------------
# HTML


def _header(ctx: dict, f: dict) -> str:
    stats = [("main", f"{f['split']} accuracy", _pct(f["acc"]), f"{f['n_eval']:,} images" if f["n_eval"] else ""),
             ("", "best val accuracy", _pct(f["best_val_acc"]), f"epoch {f['best_epoch']}" if f["best_epoch"] else ""),
             ("", f"{f['split']} loss", _num(f["loss"]), "cross-entropy"),
             ("", "macro F1", _num(f["macro_f1"]), f"{f['classes']} classes")]
    if f["top5"] is not None:
        stats.append(("", "top-5 accuracy", _pct(f["top5"]), ""))
    stats += [("", "calibration (ECE)", _num(f["ece"]), "15 bins"),
              ("", "epochs", str(f["epochs"] or "–"), "stopped early" if f["stopped_early"] else ""),
              ("", "time", _duration(f["seconds"]), e(str(f["device"] or "")))]
    tiles = "".join(f'<div class="stat {c}"><div class="k">{e(k)}</div><div class="v">{v}</div>'
                    f'<div class="s">{e(s) if s else "&nbsp;"}</div></div>' for c, k, v, s in stats)
    params = f" · <b>{f['params']:,}</b> parameters" if f["params"] else ""
    model = f"<b>{e(str(f['model']))}</b>{params} on " if f["model"] else ""
    sub = (f"{model}<b>{e(str(f['data']))}</b> ({f['classes']} classes, "
           f"{e(f['input'])}{', ' + e(f['sizes']) if f['sizes'] else ''})"
           + (f" · started {e(str(f['started']))}" if f["started"] else ""))
    return (f'<header class="hero" id="top"><div class="eyebrow">cnnlab run report</div><h1>{e(f["name"])}</h1>'
            f'<p class="sub">{sub}</p><div class="stats">{tiles}</div></header>')


def _diagnostics(ctx: dict) -> str:
    items = []
    for x in ctx["findings"]:
        nxt = f'<p class="next"><b>Try next:</b> {e(x.next)}</p>' if x.next else ""
        items.append(f'<div class="finding" style="--c:{SEV_COLOUR.get(x.severity, "#64748b")}">'
                     f'<span class="sev">{SEV_LABEL.get(x.severity, x.severity)}</span><h3>{e(x.title)}</h3>'
                     f'<p>{e(x.text)}</p>{nxt}</div>')
    notes = "".join(f'<p class="note">{e(n)}</p>' for n in ctx["run"]["notes"])
    return "".join(items) + notes


def _classes(ctx: dict) -> str:
    s = ctx["run"]["summary"]
    rows = [[e(r["name"]), _num(r["precision"]), _num(r["recall"]), _num(r["f1"]), f"{r['support']:,}"]
            for r in s["per_class"]]
    cls = [""] * len(rows)
    rows.append(["accuracy", "", "", _num(s["accuracy"]), f"{s['n']:,}"])
    for avg in ("macro", "weighted"):
        a = s[avg]
        rows.append([f"{avg} avg", _num(a["precision"]), _num(a["recall"]), _num(a["f1"]), f"{a['support']:,}"])
    cls += ["total", "", ""]
    report = _table(["class", "precision", "recall", "F1", "support"], rows, {1, 2, 3, 4}, cls, nowrap={0})
    pc = []
    for r in per_class_rows(ctx):
        low = " low" if r["flagged"] else ""
        bar = f'<span class="bar{low}"><i style="width:{100 * r["accuracy"]:.1f}%"></i></span>{_pct(r["accuracy"])}'
        tag = '<span class="tag">flagged</span>' if r["flagged"] else ""
        pc.append([e(r["name"]) + tag, f"{r['support']:,}", f"{r['predicted']:,}", f"{r['correct']:,}", bar,
                   e(r["confused"])])
    per = _table(["class", "images", "predicted", "correct", "accuracy", "mistaken for"], pc, {1, 2, 3}, nowrap={4})
    return (f'<div class="split"><div><h3>Classification report</h3><div class="scroll">{report}</div></div>'
            f'<div><h3>Per class, hardest first</h3><div class="scroll">{per}</div></div></div>')


def _failures_table(ctx: dict, top: int = 15) -> str:
    wrong = sorted((r for r in ctx["run"]["pred_rows"] if r["target"] != r["pred"]), key=lambda r: -r["loss"])[:top]
    if not wrong:
        return ""
    rows = [[str(r["index"]), f"<code>{e(str(r['id']))}</code>", e(r["target_name"]), e(r["pred_name"]),
             _pct(r["confidence"]), _num(r["loss"])] for r in wrong]
    return (f'<div class="card"><h3 style="margin-top:0">Highest-loss mistakes</h3>'
            f'{_table(["row", "id", "true", "predicted", "confidence", "loss"], rows, {0, 4, 5})}'
            f'<p class="note">All {ctx["n_failures"]:,} misclassified images are listed in '
            f'<code>failures.csv</code>.</p></div>')


def _data(ctx: dict) -> str:
    d = ctx["run"]["data"]
    if not d:
        return ""
    counts = d.get("counts") or {}
    splits = [s for s in ("train", "val", "test") if counts.get(s)]
    rows = [[e(c)] + [f"{counts[s].get(c, 0):,}" for s in splits] for c in ctx["run"]["classes"]]
    rows.append(["total"] + [f"{sum(counts[s].values()):,}" for s in splits])
    table = _table(["class"] + splits, rows, set(range(1, len(splits) + 1)), [""] * (len(rows) - 1) + ["total"])
    kv = {"data set": d.get("name"), "classes": d.get("num_classes"), "input": facts(ctx)["input"],
          "evaluated split": d.get("eval_split"),
          "mean": ", ".join(f"{v:.4f}" for v in d.get("mean") or []),
          "std": ", ".join(f"{v:.4f}" for v in d.get("std") or [])}
    dl = "".join(f"<dt>{e(k)}</dt><dd>{e(str(v))}</dd>" for k, v in kv.items() if v not in (None, ""))
    fnd = d.get("findings") or []
    ftab = ""
    if fnd:
        frows = [[e(str(x.get("severity", ""))), e(str(x.get("kind", ""))), f"<code>{e(str(x.get('path', '')))}</code>",
                  e(str(x.get("message", "")))] for x in fnd[:100]]
        ftab = f'<h3>Data checks</h3><div class="scroll">{_table(["severity", "kind", "path", "message"], frows)}</div>'
    return (f'<div class="grid2"><div class="card"><h3 style="margin-top:0">Summary</h3><dl class="kv">{dl}</dl></div>'
            f'<div><div class="scroll">{table}</div></div></div>{ftab}')


def _env(ctx: dict) -> str:
    env = ctx["run"]["env"] or {}
    dl = "".join(f"<dt>{e(k)}</dt><dd><code>{e(' '.join(v) if isinstance(v, list) else str(v))}</code></dd>"
                 for k, v in env.items())
    return f'<div class="card"><dl class="kv">{dl}</dl></div>' if dl else ""


LEADS = {
    "diagnostics": ("Diagnostics", "What the saved results say, most serious first."),
    "curves": ("Training curves", "How loss and accuracy moved during training."),
    "confusion": ("Confusion matrices", "On the {split} split: where the mistakes go."),
    "classes": ("Per-class results", "Precision, recall and F1 per class, as scikit-learn reports them."),
    "failures": ("Failures", "The mistakes with the highest loss: confidently wrong, or far from the right class."),
    "predictions": ("Predictions", "A sample of images with what the model says."),
    "inside": ("Inside the model", "Filters, activations and class evidence of the best checkpoint."),
    "data": ("Data", "Class counts per split and the normalisation used."),
    "model": ("Model", "{model}"),
    "config": ("Config", "The resolved config; <code>cnnlab train config.yaml</code> repeats the run."),
    "environment": ("Environment", "Versions and machine."),
}


def _sections(ctx: dict, f: dict) -> dict[str, str]:
    """Section id -> body HTML, in page order; a section whose files are missing is left out."""
    from cnnlab.report.plots import CM_SIDE_BY_SIDE

    run, figs = ctx["run"], ctx["figs"]
    few = len(run["classes"]) <= CM_SIDE_BY_SIDE  # small figures two abreast, large ones at full width

    def figs_of(*keys, pair=False):
        body = "".join(_fig(figs, k) for k in keys)
        return f'<div class="grid2">{body}</div>' if pair and few and body else body

    mod = run["model"] or {}
    out = {"diagnostics": _diagnostics(ctx), "curves": figs_of("curves", "steps", "lr")}
    if run["summary"]:
        out["confusion"] = figs_of("confusion_matrix", "confusion_normalized", pair=True)
        out["classes"] = _classes(ctx) + '<div style="height:16px"></div>' + figs_of("per_class", "reliability", pair=True)
    out["failures"] = figs_of("failures") + _failures_table(ctx)
    out["predictions"] = figs_of("predictions")
    out["inside"] = figs_of("filters", "feature_maps", "gradcam")
    out["data"] = _data(ctx)
    out["model"] = f"<pre>{e(mod['summary_text'])}</pre>" if mod.get("summary_text") else ""
    out["config"] = f"<pre>{e(run['config_text'])}</pre>" if run["config_text"] else ""
    out["environment"] = _env(ctx)
    return {k: v for k, v in out.items() if v}


def html(ctx: dict) -> str:
    run, f = ctx["run"], facts(ctx)
    mod = run["model"] or {}
    model_lead = (f"{e(str(mod.get('name', '')))}: {mod.get('total_params', 0):,} parameters, "
                  f"{mod.get('trainable_params', 0):,} trainable.")
    sections = _sections(ctx, f)
    counts: dict[str, int] = {}
    for x in ctx["findings"]:
        counts[x.severity] = counts.get(x.severity, 0) + 1
    worst = next((s for s in ("error", "warning") if counts.get(s)), None)
    badge = f'<span class="badge" style="background:{SEV_COLOUR[worst]}">{counts[worst]}</span>' if worst else ""
    links = "".join(f'<a href="#{sid}">{LEADS[sid][0]}{badge if sid == "diagnostics" else ""}</a>' for sid in sections)
    nav = (f'<nav><div class="brand">cnn<span>lab</span></div><div class="run">{e(f["name"])}</div>'
           f'<a href="#top">Overview</a>{links}</nav>')
    body = "".join(f'<section id="{sid}"><h2>{LEADS[sid][0]}</h2><p class="lead">'
                   f'{LEADS[sid][1].format(split=e(f["split"]), model=model_lead)}</p>{content}</section>'
                   for sid, content in sections.items())
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width,initial-scale=1"><title>{e(f["name"])} · cnnlab report</title>'
            f'<style>{CSS}</style></head><body><div class="layout">{nav}<main>{_header(ctx, f)}{body}'
            f'<footer>Drawn from the files in <code>{e(str(run["dir"].name))}/</code> by <code>cnnlab report</code>; '
            f'nothing was retrained.</footer></main></div></body></html>\n')
