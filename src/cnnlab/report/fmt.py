"""Formatting shared by every report writer (HTML, Markdown, a comparison's pages): numbers, percentages,
durations, times, severity labels, and the run's headline facts. Plain functions of plain values;
imports nothing from cnnlab."""
from __future__ import annotations

SEV_LABEL = {"error": "Problem", "warning": "Warning", "info": "Note", "ok": "OK"}
SEV_COLOUR = {"error": "#dc2626", "warning": "#d97706", "info": "#2563eb", "ok": "#16a34a"}


def pct(x) -> str:
    """0.1234 -> '12.3%'; None -> '–'."""
    return "–" if x is None else f"{100 * float(x):.1f}%"


def num(x, fmt: str = ".3f") -> str:
    return "–" if x is None else format(float(x), fmt)


def duration(s) -> str:
    """Seconds as people read them: '12.5 s', '3 min 04 s', '2 h 05 min'."""
    if s is None:
        return "–"
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def when(stamp) -> str | None:
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


def train_seconds(run: dict) -> float | None:
    """Training time: metrics.json, else env.json's train_seconds, else the sum of history.csv's seconds."""
    for v in ((run["metrics"] or {}).get("seconds"), (run["env"] or {}).get("train_seconds")):
        if v is not None:
            return float(v)
    secs = [x for x in run["history"].get("seconds", []) if x == x]
    return float(sum(secs)) if secs else None


def facts(ctx: dict) -> dict:
    """The run's headline facts (name, model, data, accuracy, ...) for any writer's header."""
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
        "stopped_early": m.get("stopped_early"), "seconds": train_seconds(run),
        "device": env.get("device"), "started": when(env.get("started")), "n_eval": s.get("n"),
    }
