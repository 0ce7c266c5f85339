"""Value checks that types alone cannot express (`validate`: ranges, keys that contradict each other, the
optimizer's name among torch.optim's), the study's `search:` section (`search_config`) and `tta_mode`.
Imports config/schema.py and config/coerce.py only; data-set and model names are checked where they are built."""
from __future__ import annotations

import difflib
import math
import re
import typing
from typing import Any

from cnnlab.config.coerce import build
from cnnlab.config.schema import (EPOCH_METRICS, MAX_IMAGE_SIDE, SPACE_KINDS, AugmentConfig, Config, ConfigError,
                                  OptimName, SearchConfig, TrainConfig)


def _check(cond: bool, key: str, value: Any, what: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r}: {what}")


# torch.optim classes that cannot run in a plain training step: LBFGS needs a closure, SparseAdam sparse gradients
UNSUPPORTED_OPTIMIZERS = ("LBFGS", "SparseAdam")


def torch_optimizers() -> dict[str, str]:
    """The choices of optim.name beyond OptimName: {lower-case name: class name} of every torch.optim optimizer
    a training step can run. Imports torch.optim, so only called for a name outside OptimName."""
    import torch.optim

    return {n.lower(): n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)
            and issubclass(getattr(torch.optim, n), torch.optim.Optimizer) and n != "Optimizer"
            and n not in UNSUPPORTED_OPTIMIZERS}


def _check_optimizer_name(name: str) -> None:
    if name in typing.get_args(OptimName):
        return
    known = torch_optimizers()
    if name.lower() in known:
        return
    own = list(typing.get_args(OptimName))
    close = difflib.get_close_matches(name.lower(), own + list(known), n=1, cutoff=0.5)
    hint = f" Did you mean {(known.get(close[0], close[0]))!r}?" if close else ""
    raise ConfigError(f"optim.name={name!r} is not one of {', '.join(own)} or a torch.optim optimizer "
                      f"({', '.join(sorted(known.values(), key=str.lower))}).{hint}")


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express. Data-set and model names are checked where they are
    built (data/catalog.py, models/build.py; experiment.check_names runs both before any work)."""
    d, m, o, s, t = cfg.data, cfg.model, cfg.optim, cfg.schedule, cfg.train
    if m.name == "layers":
        _check(bool(m.layers), "model.layers", m.layers, "model 'layers' needs a non-empty list of layers")
    for key, val in (("data.val_split", d.val_split), ("data.test_split", d.test_split)):
        if val is not None:
            _check(val >= 0, key, val, "must be >= 0 (a fraction below 1 or a count)")
            if isinstance(val, float):
                _check(val < 1, key, val, "a fraction must be below 1 (or give a whole count)")
    _check(d.limit_train is None or d.limit_train > 0, "data.limit_train", d.limit_train, "must be > 0")
    _check(d.image_size is None or d.image_size > 0, "data.image_size", d.image_size, "must be > 0")
    _check(d.image_size is None or d.image_size <= MAX_IMAGE_SIDE, "data.image_size", d.image_size,
           f"at most {MAX_IMAGE_SIDE} (a {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} image is 67 M pixels per image)")
    _check(d.channels in (None, 1, 3), "data.channels", d.channels, "must be 1 or 3")
    if d.eval_resize_size is not None:
        _check(d.image_size is not None, "data.eval_resize_size", d.eval_resize_size,
               "needs data.image_size (the side of the center crop)")
        _check(d.image_size is None or d.image_size <= d.eval_resize_size <= MAX_IMAGE_SIDE, "data.eval_resize_size",
               d.eval_resize_size, f"must be between data.image_size ({d.image_size}) and {MAX_IMAGE_SIDE}")
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    _check(d.augment.crop_padding >= 0, "data.augment.crop_padding", d.augment.crop_padding, "must be >= 0")
    _check(d.augment.cutout >= 0, "data.augment.cutout", d.augment.cutout, "must be >= 0")
    _validate_augment(d.augment)
    if d.std is not None:
        _check(all(v > 0 for v in d.std), "data.std", d.std, "every std must be > 0")
    if d.mean is not None and d.std is not None:
        _check(len(d.mean) == len(d.std), "data.mean", d.mean, "needs one value per channel, as data.std")

    _check(m.dropout is None or 0 <= m.dropout < 1, "model.dropout", m.dropout, "must be in [0, 1)")
    _check(m.padding is None or m.padding >= 0, "model.padding", m.padding, "must be >= 0")
    if m.freeze not in ("none", "backbone"):
        _check(m.freeze.isdigit(), "model.freeze", m.freeze, "must be none, backbone or a number of stages")

    _check_optimizer_name(o.name)
    _check(o.lr == "auto" or o.lr > 0, "optim.lr", o.lr, "the learning rate must be > 0 (or auto)")
    _check(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must be in [0, 1)")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _check(o.norm_lr_scale > 0, "optim.norm_lr_scale", o.norm_lr_scale, "must be > 0")
    _check(not o.decay_per_step or o.decay_bias_and_norm, "optim.decay_per_step", o.decay_per_step,
           "needs optim.decay_bias_and_norm=true (only then are norm parameters decayed)")
    _check(not (o.nesterov and (o.name != "sgd" or o.momentum == 0)), "optim.nesterov", o.nesterov,
           "Nesterov needs optim.name=sgd and momentum > 0")
    _check(all(0 <= b < 1 for b in o.betas), "optim.betas", o.betas, "each beta must be in [0, 1)")

    _check(s.step_size > 0, "schedule.step_size", s.step_size, "must be > 0")
    _check(0 < s.gamma <= 1, "schedule.gamma", s.gamma, "must be in (0, 1]")
    _check(s.warmup_epochs >= 0, "schedule.warmup_epochs", s.warmup_epochs, "must be >= 0")
    _check(s.patience >= 0, "schedule.patience", s.patience, "must be >= 0")
    _check(0 < s.pct_start < 1, "schedule.pct_start", s.pct_start, "must be in (0, 1)")
    _check(s.div_factor >= 1, "schedule.div_factor", s.div_factor, "must be >= 1")
    _check(s.final_div_factor >= 1, "schedule.final_div_factor", s.final_div_factor, "must be >= 1")

    _check(t.epochs > 0, "train.epochs", t.epochs, "must be > 0")
    _check(t.batch_size > 0, "train.batch_size", t.batch_size, "the batch size must be > 0")
    _check(t.eval_batch_size > 0, "train.eval_batch_size", t.eval_batch_size, "must be > 0")
    _check(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda") or t.device == "mps",
           "train.device", t.device, "must be auto, cpu, cuda or cuda:N")
    _check(t.early_stop.patience is None or t.early_stop.patience > 0, "train.early_stop.patience",
           t.early_stop.patience, "must be > 0 (or null for off)")
    _check(t.early_stop.min_delta >= 0, "train.early_stop.min_delta", t.early_stop.min_delta, "must be >= 0")
    _check(0 <= t.label_smoothing < 1, "train.label_smoothing", t.label_smoothing, "must be in [0, 1)")
    if isinstance(t.class_weights, tuple):
        _check(len(t.class_weights) > 0 and all(w >= 0 for w in t.class_weights) and any(t.class_weights),
               "train.class_weights", list(t.class_weights), "every weight must be >= 0, and not all 0")
    _check(t.accumulate > 0, "train.accumulate", t.accumulate, "must be >= 1 (micro-batches per optimizer step)")
    c = t.clip_grad
    _check(c.norm is None or c.value is None, "train.clip_grad", {"norm": c.norm, "value": c.value},
           "clip by norm or by value, not both")
    for key, v in (("train.clip_grad.norm", c.norm), ("train.clip_grad.value", c.value)):
        _check(v is None or v > 0, key, v, "must be > 0 (or null for off)")
    _check(t.log_every > 0, "train.log_every", t.log_every, "must be > 0")
    _check(t.limit_batches is None or t.limit_batches > 0, "train.limit_batches", t.limit_batches, "must be > 0")
    _check(not (t.tta == "none" and t.tta_flip), "train.tta", t.tta, "contradicts train.tta_flip=true (drop one)")
    _check(0 <= t.lookahead_start < 1, "train.lookahead_start", t.lookahead_start, "a fraction of training in [0, 1)")
    _check(t.ema is None or 0 < t.ema < 1, "train.ema", t.ema, "the EMA decay must be in (0, 1)")
    _check(t.checkpoint_every_steps is None or t.checkpoint_every_steps > 0, "train.checkpoint_every_steps",
           t.checkpoint_every_steps, "must be > 0")
    _check(t.threads is None or t.threads > 0, "train.threads", t.threads, "must be > 0")
    _check(cfg.repeats > 0, "repeats", cfg.repeats, "must be > 0")
    search_config(cfg)
    for name, ov in cfg.variations.items():
        _check(isinstance(ov, dict) or ov is None, f"variations.{name}", ov, "must be a mapping of key: value")
    for key, vals in cfg.grid.items():
        _check(isinstance(vals, list) and len(vals) > 0, f"grid.{key}", vals, "must be a non-empty list")


def _validate_augment(a: AugmentConfig) -> None:
    k = "data.augment."
    if a.random_resized_crop is not None:
        sc, ra = a.random_resized_crop.scale, a.random_resized_crop.ratio
        _check(0 < sc[0] <= sc[1] <= 1, k + "random_resized_crop.scale", list(sc), "needs 0 < low <= high <= 1")
        _check(0 < ra[0] <= ra[1], k + "random_resized_crop.ratio", list(ra), "needs 0 < low <= high")
    if a.randaugment is not None:
        _check(a.randaugment.num_ops >= 0, k + "randaugment.num_ops", a.randaugment.num_ops, "must be >= 0")
        _check(0 <= a.randaugment.magnitude <= 30, k + "randaugment.magnitude", a.randaugment.magnitude,
               "must be in 0..30")
    policies = [n for n, on in (("randaugment", a.randaugment is not None), ("trivialaugment", a.trivialaugment),
                                ("autoaugment", a.autoaugment is not None)) if on]
    if len(policies) > 1:
        raise ConfigError(f"{k}{policies[1]}: choose one augmentation policy; {' and '.join(k + p for p in policies)} "
                          "are both set")
    _check(0 <= a.rotation <= 180, k + "rotation", a.rotation, "degrees in [0, 180]")
    cj = (a.color_jitter,) * 3 if isinstance(a.color_jitter, float) else a.color_jitter
    _check(all(v >= 0 for v in cj), k + "color_jitter", a.color_jitter, "every factor must be >= 0")
    _check(len(cj) < 4 or cj[3] <= 0.5, k + "color_jitter", a.color_jitter, "hue must be in [0, 0.5]")
    _check(0 <= a.random_erasing <= 1, k + "random_erasing", a.random_erasing, "a probability in [0, 1]")
    _check(a.mixup >= 0, k + "mixup", a.mixup, "the alpha must be >= 0 (0 = off)")
    _check(a.cutmix >= 0, k + "cutmix", a.cutmix, "the alpha must be >= 0 (0 = off)")


def tta_mode(t: TrainConfig) -> str:
    """train.tta resolved: its value, or (null) flip when the older train.tta_flip is set, else none."""
    return t.tta if t.tta is not None else ("flip" if t.tta_flip else "none")


def search_config(cfg: Config) -> SearchConfig | None:
    """The study's search (validated, errors naming `search.<key>`), or None when it has none."""
    if not cfg.search:
        return None
    s = build(SearchConfig, cfg.search, "search")
    _check(bool(s.space), "search.space", s.space, "name at least one setting to search over")
    for key, spec in s.space.items():
        _check_space(str(key), spec)
    _check(s.trials > 0, "search.trials", s.trials, "must be > 0")
    _check(s.objective in EPOCH_METRICS or s.objective in ("best_val_acc", "best_val_loss")
           or s.objective.startswith("test."), "search.objective", s.objective,
           f"one of {', '.join(EPOCH_METRICS)}, best_val_acc, best_val_loss or test.<metric> (e.g. test.accuracy)")
    _check(s.pruner == "none" or s.objective in EPOCH_METRICS, "search.pruner", s.pruner,
           f"a pruner judges a trial by its objective every epoch: use one of {', '.join(EPOCH_METRICS)} as "
           "search.objective, or pruner: none")
    _check(s.sampler != "grid" or all(isinstance(v, list) or "categorical" in (v or {}) for v in s.space.values()),
           "search.sampler", s.sampler, "grid needs every search.space entry to be a list of values (categorical)")
    _check(s.startup_trials >= 0, "search.startup_trials", s.startup_trials, "must be >= 0")
    _check(s.warmup_epochs >= 0, "search.warmup_epochs", s.warmup_epochs, "must be >= 0")
    _check(s.reduction_factor >= 2, "search.reduction_factor", s.reduction_factor, "must be >= 2")
    return s


def _check_space(key: str, spec: Any) -> None:
    where = f"search.space.{key}"
    _check(bool(re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", key)), where, spec,
           "the key must be a dotted config key such as optim.lr or data.augment.cutout")
    _check(key.split(".")[0] not in ("output", "search", "variations", "grid", "repeats", "baseline"), where, spec,
           "output, search and study keys cannot be searched")
    if isinstance(spec, list):
        spec = {"categorical": spec}
    _check(isinstance(spec, dict) and len([k for k in spec if k in SPACE_KINDS]) == 1, where, spec,
           f"give one of {', '.join(SPACE_KINDS)}, e.g. {{loguniform: [1e-4, 1e-1]}}")
    kind = next(k for k in spec if k in SPACE_KINDS)
    extra = set(spec) - {kind, "step", "log"}
    _check(not extra, where, spec, f"unknown option(s) {', '.join(map(str, extra))} (only step and log)")
    values = spec[kind]
    if kind == "categorical":
        _check(isinstance(values, list) and len(values) > 0, where, spec, "categorical needs a non-empty list")
        _check(all(v is None or isinstance(v, (bool, int, float, str)) for v in values), where, spec,
               "categorical values must be numbers, text, true/false or null")
        return
    _check(isinstance(values, list) and len(values) == 2 and all(isinstance(v, (int, float)) and not
           isinstance(v, bool) and math.isfinite(v) for v in values), where, spec, f"{kind} needs [low, high]")
    lo, hi = values
    _check(lo < hi, where, spec, "low must be below high")
    _check(kind != "loguniform" or lo > 0, where, spec, "loguniform needs low > 0")
    if kind == "int":
        _check(all(float(v).is_integer() for v in values), where, spec, "int needs whole numbers")
    step = spec.get("step")
    _check(step is None or (isinstance(step, (int, float)) and not isinstance(step, bool) and step > 0), where,
           spec, "step must be a number > 0")
    _check("log" not in spec or isinstance(spec["log"], bool), where, spec, "log must be true or false")
