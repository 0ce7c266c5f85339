"""report.html: one self-contained page (inline CSS, images as data URIs, no scripts) rendering the sections
declared in sections.py, each content block type in HTML. The Markdown twin is md.py. CSS and the small
HTML pieces (`table`, `img`, `text`) are public: the comparison's page and deploy's Grad-CAM page share the CSS."""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from cnnlab.report import sections as S
from cnnlab.report.fmt import SEV_COLOUR, SEV_LABEL, duration, facts, num, pct

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

e = html.escape


def table(head: list[str], rows: list[list], num: set[int] = frozenset(), cls: list[str] | None = None,
          nowrap: set[int] = frozenset()) -> str:
    """An HTML table of ready-made cell HTML. num: right-aligned number columns; nowrap: columns kept on one
    line; cls: a class per row."""
    def td(i, c):
        return f'<td class="n">{c}</td>' if i in num else f'<td class="b">{c}</td>' if i in nowrap else f"<td>{c}</td>"

    th = "".join(f'<th class="n">{h}</th>' if i in num else f"<th>{h}</th>" for i, h in enumerate(head))
    body = []
    for k, row in enumerate(rows):
        tds = "".join(td(i, c) for i, c in enumerate(row))
        body.append(f'<tr class="{cls[k]}">{tds}</tr>' if cls and cls[k] else f"<tr>{tds}</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def img(path: Path, alt: str) -> str:
    """An <img> with the PNG inlined as a data URI."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{e(alt)}">'


def text(s: str) -> str:
    """Plain text (with `code` spans) as HTML."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", e(s))


# ----------------------------------------------------------------------------------------------
# Blocks


def _cell(c) -> str:
    if isinstance(c, S.Code):
        return f"<code>{e(c.text)}</code>"
    if isinstance(c, S.Bar):
        low = " low" if c.low else ""
        return f'<span class="bar{low}"><i style="width:{100 * c.value:.1f}%"></i></span>{pct(c.value)}'
    if isinstance(c, S.Flagged):
        return e(c.text) + '<span class="tag">flagged</span>'
    return e(str(c))


def _figure(ctx: dict, f: S.Figure) -> str:
    d = ctx["figs"][f.key]
    return (f'<div class="card"><figure>{img(d["path"], f.title)}<figcaption><b>{e(f.title)}.</b> '
            f'{e(d["caption"])} <span class="note">(plots/{e(Path(d["path"]).name)})</span></figcaption></figure>'
            f'</div>')


def _table(t: S.Table, card: bool) -> str:
    n = len(t.rows)
    cls = ["total" if i >= n - t.totals else "" for i in range(n)] if t.totals else None
    out = table([e(h) for h in t.head], [[_cell(c) for c in r] for r in t.rows], t.num, cls, t.nowrap)
    if t.scroll:
        out = f'<div class="scroll">{out}</div>'
    note = f'<p class="note">{"".join(_cell(c) for c in t.note)}</p>' if t.note else ""
    if card:
        title = f'<h3 style="margin-top:0">{e(t.title)}</h3>' if t.title else ""
        return f'<div class="card">{title}{out}{note}</div>'
    return (f"<h3>{e(t.title)}</h3>" if t.title else "") + out + note


def _block(ctx: dict, b, nested: bool = False) -> str:
    if isinstance(b, S.Figures):
        body = "".join(_figure(ctx, f) for f in b.figures)
        few = len(ctx["run"]["classes"]) <= _cm_side_by_side()  # small figures two abreast, large at full width
        return f'<div class="grid2">{body}</div>' if b.pair and few else body
    if isinstance(b, S.Findings):
        items = []
        for x in b.items:
            nxt = f'<p class="next"><b>Try next:</b> {e(x.next)}</p>' if x.next else ""
            items.append(f'<div class="finding" style="--c:{SEV_COLOUR.get(x.severity, "#64748b")}">'
                         f'<span class="sev">{SEV_LABEL.get(x.severity, x.severity)}</span><h3>{e(x.title)}</h3>'
                         f'<p>{e(x.text)}</p>{nxt}</div>')
        return "".join(items) + "".join(f'<p class="note">{e(n)}</p>' for n in b.notes)
    if isinstance(b, S.Table):
        return _table(b, card=not nested and not b.scroll)
    if isinstance(b, S.KeyValues):
        val = (lambda v: f"<code>{e(str(v))}</code>") if b.code else (lambda v: e(str(v)))
        dl = "".join(f"<dt>{e(k)}</dt><dd>{val(v)}</dd>" for k, v in b.items.items())
        title = f'<h3 style="margin-top:0">{e(b.title)}</h3>' if b.title else ""
        return f'<div class="card">{title}<dl class="kv">{dl}</dl></div>'
    if isinstance(b, S.Pre):
        return f"<pre>{e(b.text)}</pre>"
    if isinstance(b, S.Columns):
        if b.kind == "grid":
            return f'<div class="grid2">{"".join(f"<div>{_block(ctx, x, True)}</div>" for x in b.blocks)}</div>'
        return f'<div class="split">{"".join(f"<div>{_block(ctx, x, True)}</div>" for x in b.blocks)}</div>'
    raise TypeError(f"report.html cannot render a {type(b).__name__}")


def _cm_side_by_side() -> int:
    from cnnlab.report.plots import CM_SIDE_BY_SIDE

    return CM_SIDE_BY_SIDE


# ----------------------------------------------------------------------------------------------
# The page


def _header(ctx: dict, f: dict) -> str:
    stats = [("main", f"{f['split']} accuracy", pct(f["acc"]), f"{f['n_eval']:,} images" if f["n_eval"] else ""),
             ("", "best val accuracy", pct(f["best_val_acc"]), f"epoch {f['best_epoch']}" if f["best_epoch"] else ""),
             ("", f"{f['split']} loss", num(f["loss"]), "cross-entropy"),
             ("", "macro F1", num(f["macro_f1"]), f"{f['classes']} classes")]
    if f["top5"] is not None:
        stats.append(("", "top-5 accuracy", pct(f["top5"]), ""))
    stats += [("", "calibration (ECE)", num(f["ece"]), "15 bins"),
              ("", "epochs", str(f["epochs"] or "–"), "stopped early" if f["stopped_early"] else ""),
              ("", "time", duration(f["seconds"]), e(str(f["device"] or "")))]
    tiles = "".join(f'<div class="stat {c}"><div class="k">{e(k)}</div><div class="v">{v}</div>'
                    f'<div class="s">{e(s) if s else "&nbsp;"}</div></div>' for c, k, v, s in stats)
    params = f" · <b>{f['params']:,}</b> parameters" if f["params"] else ""
    model = f"<b>{e(str(f['model']))}</b>{params} on " if f["model"] else ""
    sub = (f"{model}<b>{e(str(f['data']))}</b> ({f['classes']} classes, "
           f"{e(f['input'])}{', ' + e(f['sizes']) if f['sizes'] else ''})"
           + (f" · started {e(str(f['started']))}" if f["started"] else ""))
    return (f'<header class="hero" id="top"><div class="eyebrow">cnnlab run report</div><h1>{e(f["name"])}</h1>'
            f'<p class="sub">{sub}</p><div class="stats">{tiles}</div></header>')


def html(ctx: dict, sections: list[S.Section] | None = None) -> str:
    run, f = ctx["run"], facts(ctx)
    shown = [(s, S.blocks_of(s, ctx)) for s in (S.SECTIONS if sections is None else sections)]
    shown = [(s, b) for s, b in shown if b]
    counts: dict[str, int] = {}
    for x in ctx["findings"]:
        counts[x.severity] = counts.get(x.severity, 0) + 1
    worst = next((s for s in ("error", "warning") if counts.get(s)), None)
    badge = f'<span class="badge" style="background:{SEV_COLOUR[worst]}">{counts[worst]}</span>' if worst else ""
    links = "".join(f'<a href="#{s.id}">{e(s.title)}{badge if any(isinstance(x, S.Findings) for x in b) else ""}</a>'
                    for s, b in shown)
    nav = (f'<nav><div class="brand">cnn<span>lab</span></div><div class="run">{e(f["name"])}</div>'
           f'<a href="#top">Overview</a>{links}</nav>')
    body = "".join(f'<section id="{s.id}"><h2>{e(s.title)}</h2><p class="lead">{text(S.lead_of(s, ctx))}</p>'
                   + "".join(_block(ctx, x) for x in b) + "</section>" for s, b in shown)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width,initial-scale=1"><title>{e(f["name"])} · cnnlab report</title>'
            f'<style>{CSS}</style></head><body><div class="layout">{nav}<main>{_header(ctx, f)}{body}'
            f'<footer>Drawn from the files in <code>{e(str(run["dir"].name))}/</code> by <code>cnnlab report</code>; '
            f'nothing was retrained.</footer></main></div></body></html>\n')
