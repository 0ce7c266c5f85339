"""report.md: the Markdown twin of report.html. It renders the same SECTIONS (sections.py), linking the PNGs
in plots/ instead of embedding them."""
from __future__ import annotations

from pathlib import Path

from cnnlab.report import sections as S
from cnnlab.report.fmt import SEV_LABEL, duration, facts, pct


def md_table(head: list[str], rows: list[list]) -> str:
    def cell(c):
        return str(c).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows])


def _cell(c) -> str:
    if isinstance(c, S.Code):
        return f"`{c.text}`"
    if isinstance(c, S.Bar):
        return pct(c.value)
    if isinstance(c, S.Flagged):
        return f"{c.text} (flagged)"
    return str(c)


def _block(ctx: dict, b) -> list[str]:
    """Lines of one block, each block opening with an empty line."""
    if isinstance(b, S.Figures):
        out = []
        for f in b.figures:
            d = ctx["figs"][f.key]
            out += ["", f"![{f.title}](plots/{Path(d['path']).name})", "", f"*{f.title}.* {d['caption']}"]
        return out
    if isinstance(b, S.Findings):
        out = [""]
        out += [f"- **{SEV_LABEL.get(x.severity, x.severity)}: {x.title}.** {x.text}"
                + (f" *Try next:* {x.next}" if x.next else "") for x in b.items]
        return out + [f"- {n}" for n in b.notes]
    if isinstance(b, S.Table):
        n = len(b.rows)
        rows = [[(f"**{_cell(c)}**" if i >= n - b.totals and _cell(c) else _cell(c)) for c in r]
                for i, r in enumerate(b.rows)]
        out = [""] + ([f"**{b.title}**", ""] if b.title else []) + [md_table(b.head, rows)]
        return out + (["", "".join(_cell(c) for c in b.note)] if b.note else [])
    if isinstance(b, S.KeyValues):
        val = (lambda v: f"`{v}`") if b.code else str
        return [""] + ([f"**{b.title}**", ""] if b.title else []) + [f"- {k}: {val(v)}" for k, v in b.items.items()]
    if isinstance(b, S.Pre):
        return ["", f"```{b.lang}", b.text, "```"]
    if isinstance(b, S.Columns):
        return [line for x in b.blocks for line in _block(ctx, x)]
    raise TypeError(f"report.md cannot render a {type(b).__name__}")


def markdown(ctx: dict, sections: list[S.Section] | None = None) -> str:
    f = facts(ctx)
    out = [f"# {f['name']}", "",
           f"**{f['model'] or 'model'}** on **{f['data']}** ({f['classes']} classes, {f['input']}). "
           f"{f['split']} accuracy **{pct(f['acc'])}**, best val accuracy {pct(f['best_val_acc'])} "
           f"(epoch {f['best_epoch']}), {f['epochs']} epoch{'' if f['epochs'] == 1 else 's'} in {duration(f['seconds'])}."]
    for s in S.SECTIONS if sections is None else sections:
        blocks = S.blocks_of(s, ctx)
        if blocks:
            out += ["", f"## {s.title}", "", S.lead_of(s, ctx)]
            for b in blocks:
                out += _block(ctx, b)
    return "\n".join(out) + "\n"
