"""`cnnlab eval RUN_DIR [data.key=value ...]`: re-evaluate a saved run's checkpoint, optionally on other data.

Results go to RUN_DIR/evals/<n>/ (metrics.json, predictions.csv/.npz, samples.npz): the run's own
files are never overwritten. Data whose classes are a subset of the run's, or in another order, is
matched to the run's classes by name (`map_classes`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from cnnlab.data.base import ImageSet
from cnnlab.training import checkpoint as ckpt
from cnnlab import config as C
from cnnlab import rundir as R
from cnnlab import process


def map_classes(splits, run_classes: list[str]):
    """Splits whose classes are the run's, a subset of them or in another order, relabelled with the run's
    class indices (matched by name); names the run does not know are an error that lists them."""
    if splits.classes == list(run_classes):
        return splits
    unknown = [c for c in splits.classes if c not in run_classes]
    if unknown:
        raise ValueError(f"the data's classes {unknown} are not classes of the run, so they cannot be scored; "
                         f"the run's classes are {list(run_classes)} (rename the class folders to match)")
    index = np.array([list(run_classes).index(c) for c in splits.classes], dtype=np.int64)

    def relabel(s):
        return None if s is None else ImageSet(labels=index[s.labels], classes=list(run_classes), images=s.images,
                                               files=s.files, ids=s.ids)

    return dataclasses.replace(splits, train=relabel(splits.train), val=relabel(splits.val), test=relabel(splits.test),
                               classes=list(run_classes))


SPLITS = ("test", "val", "train")


def parse_splits(text: str | None) -> list[str | None]:
    """`--split val,test,train` -> ["val", "test", "train"]; None = the run's own evaluation split."""
    if not text:
        return [None]
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in SPLITS]
    if bad or not names:
        raise C.ConfigError(f"--split {text!r}: each split must be one of {', '.join(SPLITS)} (comma-separated)")
    return list(dict.fromkeys(names))


def evaluate_run(run_dir: str | Path, overrides: list[str] | None = None, *, which: str = "best",
                 split: str | None = None, tta: str | None = None) -> dict:
    """`tta` (none | flip | airbench) evaluates under that test-time augmentation; None = the run's own."""
    from cnnlab.training import experiment
    from cnnlab.training import loop as training
    from cnnlab.data.pipeline import prepare
    from cnnlab.analysis.metrics import summary

    run_dir = Path(run_dir)
    if not (run_dir / R.CONFIG).is_file():
        raise FileNotFoundError(f"{run_dir}: not a run folder (no config.yaml)")
    bad = [o for o in overrides or [] if not o.startswith("data.")]
    if bad:
        raise C.ConfigError(f"cnnlab eval takes only data.* overrides, got {', '.join(bad)}")
    cfg = C.load(run_dir / R.CONFIG, overrides)
    saved = json.loads((run_dir / R.DATA).read_text())
    # evaluate with the training run's normalisation, not the new data's statistics
    cfg = C.replace(cfg, {"data.mean": saved["mean"], "data.std": saved["std"], "data.check": False,
                          **({"train.tta": tta, "train.tta_flip": False} if tta is not None else {})})
    splits = prepare(cfg.data, split_seed=cfg.data.split_seed)
    data_classes = splits.classes
    splits = map_classes(splits, saved["classes"])
    if split is not None:  # a chosen split: the training split is evaluated in eval mode, unaugmented
        import dataclasses

        chosen = {"test": splits.test, "val": splits.val, "train": splits.train}[split]
        if chosen is None:
            raise C.ConfigError(f"--split test: the run's data has no test split (it has {', '.join(splits.indices) or 'train, val'}); "
                                "use --split val or --split train")
        splits = dataclasses.replace(splits, test=chosen, eval_split=split)
    path = run_dir / R.CHECKPOINTS / f"{which}.pt"
    c = ckpt.load(path)
    device = process.setup(cfg)  # `cnnlab eval` / evaluate_run is an entry point
    # foreign, damaged or NaN weights are refused here, before evals/<n>/ exists
    logits, targets = training.evaluate_weights(cfg, splits, c.get("model"), device, source=path)
    out = run_dir / R.EVALS
    out.mkdir(exist_ok=True)
    n = 1 + max([int(p.name) for p in out.iterdir() if p.name.isdigit()] or [0])
    dest = out / str(n)
    dest.mkdir()
    experiment.save_predictions(dest, splits, logits, targets, cfg.train.seed)
    state = c.get("state")
    result = {"checkpoint": which,
              **({"data_classes": data_classes} if data_classes != splits.classes else {}),
              "epoch": state.get("epoch") if isinstance(state, dict) else None, "data": C.to_dict(cfg.data),
              "eval_split": splits.eval_split, "test": summary(logits.numpy(), targets.numpy(), splits.classes)}
    experiment.write_json(dest / R.METRICS, result)
    return {"dir": str(dest), **result}


def main(args) -> None:
    for split in parse_splits(getattr(args, "split", None)):
        r = evaluate_run(args.run_dir, args.overrides, which=args.checkpoint, split=split)
        t = r["test"]
        if "data_classes" in r:
            print(f"classes matched by name: the data's {', '.join(r['data_classes'])} scored as the run's classes")
        print(f"{args.checkpoint} checkpoint (epoch {r['epoch']}) on {r['data']['name']} {r['eval_split']}: "
              f"accuracy {t['accuracy']:.4f}, loss {t['loss']:.4f}  -> {r['dir']}")
