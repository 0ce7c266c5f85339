"""report.md: the Markdown twin of report.html, linking the PNGs in plots/ instead of embedding them."""
from __future__ import annotations

import json
from pathlib import Path

from cnnlab.report.html import SEV_LABEL, _duration, _num, _pct, facts, per_class_rows




def _md_table(head: list[str], rows: list[list]) -> str:
    def cell(c):
        return str(c).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows])


def markdown(ctx: dict) -> str:
    run, figs, f = ctx["run"], ctx["figs"], facts(ctx)
    out = [f"# {f['name']}", "",
           f"**{f['model'] or 'model'}** on **{f['data']}** ({f['classes']} classes, {f['input']}). "
           f"{f['split']} accuracy **{_pct(f['acc'])}**, best val accuracy {_pct(f['best_val_acc'])} "
           f"(epoch {f['best_epoch']}), {f['epochs']} epoch{'' if f['epochs'] == 1 else 's'} in {_duration(f['seconds'])}.", "", "## Diagnostics", ""]
    for x in ctx["findings"]:
        out.append(f"- **{SEV_LABEL.get(x.severity, x.severity)}: {x.title}.** {x.text}"
                   + (f" *Try next:* {x.next}" if x.next else ""))
    out += [f"- {n}" for n in run["notes"]]

    def img(key):
        if key in figs:
            out.extend(["", f"![{figs[key]['title']}](plots/{Path(figs[key]['path']).name})", "",
                        f"*{figs[key]['title']}.* {figs[key]['caption']}"])

    out += ["", "## Training curves"]
    for k in ("curves", "steps", "lr"):
        img(k)
    s = run["summary"]
    if s:
        out += ["", "## Confusion matrices"]
        img("confusion_matrix")
        img("confusion_normalized")
        out += ["", "## Per-class results", ""]
        rows = [[r["name"], _num(r["precision"]), _num(r["recall"]), _num(r["f1"]), r["support"]]
                for r in s["per_class"]]
        rows.append(["**accuracy**", "", "", _num(s["accuracy"]), s["n"]])
        rows += [[f"**{a} avg**", _num(s[a]["precision"]), _num(s[a]["recall"]), _num(s[a]["f1"]), s[a]["support"]]
                 for a in ("macro", "weighted")]
        out.append(_md_table(["class", "precision", "recall", "F1", "support"], rows))
        out += ["", "Hardest classes first:", ""]
        out.append(_md_table(["class", "images", "predicted", "correct", "accuracy", "most often mistaken for"],
                             [[r["name"] + (" (flagged)" if r["flagged"] else ""), r["support"], r["predicted"],
                               r["correct"], _pct(r["accuracy"]), r["confused"]] for r in per_class_rows(ctx)]))
        img("per_class")
        img("reliability")
    if ctx["n_failures"]:
        out += ["", "## Failures", "", f"All {ctx['n_failures']} misclassified images: `failures.csv`."]
        img("failures")
    for key, title in (("predictions", "Predictions"), ("filters", "Inside the model")):
        if key in figs:
            out += ["", f"## {title}"]
            img(key)
            if key == "filters":
                img("feature_maps")
                img("gradcam")
    d = run["data"]
    if d:
        counts = d.get("counts") or {}
        splits = [x for x in ("train", "val", "test") if counts.get(x)]
        out += ["", "## Data", "", f"mean {d.get('mean')}, std {d.get('std')}", ""]
        out.append(_md_table(["class"] + splits, [[c] + [counts[x].get(c, 0) for x in splits] for c in run["classes"]]))
    if (run["model"] or {}).get("summary_text"):
        out += ["", "## Model", "", "```", run["model"]["summary_text"].rstrip(), "```"]
    if run["config_text"]:
        out += ["", "## Config", "", "```yaml", run["config_text"].rstrip(), "```"]
    if run["env"]:
        out += ["", "## Environment", "", "```json", json.dumps(run["env"], indent=1), "```"]
    return "\n".join(out) + "\n"
