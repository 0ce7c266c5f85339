"""Class imbalance in plain words: a training split whose classes differ a lot in size, each rare class's
recall next to its training count, and the config keys that address it (`train.class_weights=balanced`,
`data.sampler=balanced`). Pure functions from data.json's counts, the evaluated summary and the run's config
(`diagnose` gathers them)."""
from __future__ import annotations

RATIO = 3.0  # largest / smallest training class at which the split counts as imbalanced
KEYS = "train.class_weights=balanced (a weighted loss) or data.sampler=balanced (class-balanced draws per epoch)"


def _finding(*args):
    from cnnlab.analysis.diagnose import Finding  # (diagnose imports this module)

    return Finding(*args)


def train_counts(data_info: dict | None) -> dict[str, int]:
    """{class: training images} from data.json (empty when it has none)."""
    return {str(c): int(n) for c, n in (((data_info or {}).get("counts") or {}).get("train") or {}).items()}


def used(config: dict | None) -> list[str]:
    """The imbalance settings the run already used, as `key=value` (from config.yaml as a mapping)."""
    train, data = (config or {}).get("train") or {}, (config or {}).get("data") or {}
    out = []
    if train.get("class_weights") not in (None, "none"):
        out.append(f"train.class_weights={train['class_weights']}")
    if data.get("sampler") not in (None, "shuffle"):
        out.append(f"data.sampler={data['sampler']}")
    return out


def findings(summary: dict | None, data_info: dict | None, config: dict | None = None) -> list:
    """One finding when the training classes differ by RATIO or more: the rarest classes with their training
    count and recall on the evaluated split, and what to try (or what the run already tried)."""
    counts = train_counts(data_info)
    sizes = [n for n in counts.values() if n > 0]
    if len(sizes) < 2 or max(sizes) < RATIO * min(sizes):
        return []
    recall = {r["name"]: r["recall"] for r in (summary or {}).get("per_class") or []}
    rare = sorted(counts, key=lambda c: counts[c])[:3]
    parts = [f"'{c}' {counts[c]:,} images" + (f", recall {100 * recall[c]:.1f}%" if c in recall else "") for c in rare]
    big = max(counts, key=lambda c: counts[c])
    text = (f"The training classes differ {max(sizes) / min(sizes):.0f}x in size ('{big}' has {counts[big]:,} "
            f"images); the rarest: {'; '.join(parts)}.")
    rare_recall = [recall[c] for c in rare if c in recall]
    mean_recall = sum(recall.values()) / len(recall) if recall else None
    weak = bool(rare_recall) and mean_recall is not None and min(rare_recall) < mean_recall - 0.1
    done = used(config)
    if done:
        nxt = (f"The run already used {' and '.join(done)}; if the rare classes still lag, collect more images of "
               "them, or try the other setting.")
    else:
        nxt = f"Try {KEYS}; compare balanced accuracy (the mean recall) with a study of the variants."
    return [_finding("warning" if weak and not done else "info", "imbalance", "Imbalanced training classes", text,
                     nxt, {"counts": counts, "rare": rare, "recall": {c: recall.get(c) for c in rare},
                           "used": done})]
