"""Typed, frozen experiment configuration: YAML in, dotted `key=value` overrides, validation up front.

Every mistake in a value fails here, before any work starts, with a `ConfigError` that names the key
and the value (the CLI turns it into exit code 2). A leaf: imports no other cnnlab module but
errors.py. The choices a key takes are `Literal` types defined here, once, and checked by type in
`_coerce`; the builders (optimizers, weight init, padding, ...) take their names from them
(tests/test_architecture.py checks that each builder covers every choice). Names from the
registries (data.name, model.name) are checked where data sets and models are built.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cnnlab.errors import InputError


class ConfigError(InputError, ValueError):
    """A config that cannot be run: the message says which key, which value, and what to do."""

    label = "config error"


# The largest square side an image is resized to (data.image_size) or probed at (`cnnlab summary
# --input`): 8192 x 8192 = 67 M pixels, under Pillow's decompression-bomb limit of 89 M.
MAX_IMAGE_SIDE = 8192


# the choices of each key that takes one of a few words (did-you-mean on a typo)
PaddingMode = Literal["constant", "edge", "reflect"]  # torchvision RandomCrop's padding_mode
LoaderKind = Literal["auto", "memory", "stream"]
ValFrom = Literal["random", "last"]  # validation: stratified random, or the last N images in order
InitScheme = Literal["default", "kaiming_uniform", "kaiming_normal", "xavier_uniform", "xavier_normal"]
# the optimizers with their own config keys (momentum, nesterov, betas); optim.name also takes any
# torch.optim optimizer by its class name (RMSprop, Adagrad, NAdam, ...), checked where it is built
OptimName = Literal["sgd", "adam", "adamw", "rmsprop"]
ScheduleName = Literal["none", "step", "cosine", "onecycle", "plateau"]
Sampler = Literal["shuffle", "balanced"]  # data.sampler: a permutation per epoch, or class-balanced draws
ClassWeights = Literal["none", "balanced"]
Anneal = Literal["cos", "linear"]
Monitor = Literal["val_acc", "val_loss"]
Amp = Literal["auto", "off", "bf16", "fp16"]
Switch = Literal["auto", "on", "off"]
Progress = Literal["auto", "bar", "lines", "off"]
TtaMode = Literal["none", "flip", "airbench"]  # train.tta (models/tta.py)
ResizeMode = Literal["squash", "crop", "pad"]  # to a square: squash | shorter side + center crop | pad to square
AutoAugmentPolicy = Literal["cifar10", "imagenet", "svhn"]  # torchvision's AutoAugmentPolicy values


@dataclass(frozen=True)
class ResizedCropConfig:  # torchvision's RandomResizedCrop: area share and aspect ratio of the crop
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 4 / 3)


@dataclass(frozen=True)
class RandAugmentConfig:  # torchvision's RandAugment
    num_ops: int = 2
    magnitude: int = 9  # 0..30 (31 bins)


@dataclass(frozen=True)
class AugmentConfig:
    # random horizontal flip: true = p 0.5 drawn every step; alternate = airbench's: each image flipped at random
    # once (seeded), then every image mirrored on odd epochs (a function of seed, epoch and index only)
    hflip: bool | Literal["alternate"] = False
    crop_padding: int = 0  # random crop back to the input size after padding by this much
    crop_padding_mode: PaddingMode = "constant"  # constant (zeros) | edge | reflect, as torchvision's RandomCrop
    cutout: int = 0  # side of a random square set to zero (0 = off)
    # torchvision transforms v2, each image with its own draw (data/augment.py): null / 0 / false = off
    random_resized_crop: ResizedCropConfig | None = None  # {scale: [0.08, 1], ratio: [0.75, 1.333]}
    rotation: float = 0.0  # RandomRotation(degrees): uniform in [-rotation, rotation]
    randaugment: RandAugmentConfig | None = None  # {num_ops: 2, magnitude: 9}
    trivialaugment: bool = False  # TrivialAugmentWide
    autoaugment: AutoAugmentPolicy | None = None  # cifar10 | imagenet | svhn
    color_jitter: float | tuple[float, float, float, float] = 0.0  # brightness=contrast=saturation, or [b, c, s, hue]
    random_erasing: float = 0.0  # RandomErasing probability (the area set to 0)
    mixup: float = 0.0  # MixUp alpha (soft targets); with cutmix too, one of the two per batch
    cutmix: float = 0.0  # CutMix alpha
    # augment the whole training set once per epoch (airbench: one op per epoch, draws from (seed, epoch)) instead
    # of each batch as it is drawn (draws from (seed, step)); MixUp/CutMix stay per batch. Needs data in memory
    per_epoch: bool = False


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"
    root: str | None = None  # folder / zip / where downloads go (default ~/.cache/cnnlab/<name>)
    val_split: float | int = 0.1  # fraction (< 1) or count of the training split held out
    val_from: ValFrom = "random"  # random (stratified) | last: the last N training images, in the data set's order
    test_split: float | int | None = None  # carve a test split from train when the set has none
    split_seed: int = 0  # seed of the val/test carving: fixed apart from train.seed, so repeats share splits
    limit_train: int | None = None  # use only this many (stratified) training images
    image_size: int | None = None  # resize to this square side (None = keep)
    resize: ResizeMode = "squash"  # squash | crop (shorter side, then center crop) | pad (to a square, then resize)
    # evaluation (val, test, predict): shorter side to this, then the center image_size square; null = as
    # training (data.resize). Pretrained torchvision weights fill it from their own recipe (e.g. 256 -> 224)
    eval_resize_size: int | None = None
    channels: int | None = None  # force 1 (grey) or 3 (RGB); None = the data set's own
    mean: tuple[float, ...] | None = None  # None = computed on the training split
    std: tuple[float, ...] | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loader: LoaderKind = "auto"  # auto | memory | stream: memory = decoded uint8 cache, stream = DataLoader
    # shuffle: every image once per epoch; balanced: as many draws, with replacement, each class equally likely
    sampler: Sampler = "shuffle"
    num_workers: int = 0  # DataLoader workers on the stream path
    # augment batch i+1 in a background thread while the model trains on batch i (the same batches bit for
    # bit); auto = on when a torchvision policy (randaugment, rotation, color_jitter, ...) is set
    prefetch: Switch = "auto"
    download: bool = True  # fetch official files when missing (never in tests)
    check: bool = True  # run the fast data checks before step 0
    options: dict = field(default_factory=dict)  # data-set specific keyword arguments


@dataclass(frozen=True)
class ModelConfig:
    name: str = "lenet5"
    layers: tuple | None = None  # for name: layers, a list of layer specs
    batchnorm: bool | None = None  # None = the model's default
    dropout: float | None = None
    padding: int | None = None
    init: InitScheme = "default"  # default | kaiming_uniform | kaiming_normal | xavier_uniform | xavier_normal
    pretrained: str | None = None  # torchvision weights name or a local weights file
    freeze: str = "none"  # none | backbone | <n first stages>
    options: dict = field(default_factory=dict)  # further keyword arguments of the builder


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"  # sgd | adam | adamw | rmsprop | any torch.optim class name (Adagrad, NAdam, ...)
    args: dict = field(default_factory=dict)  # further keyword arguments of the optimizer (eps, alpha, ...)
    lr: float | Literal["auto"] = 0.01  # auto: run the learning-rate range test first (`cnnlab lr-find`), use its suggestion
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    # weight decay on biases and norm parameters too (as torch.optim's weight_decay on model.parameters()
    # does, e.g. experiment 4's L2); off = conv/linear weights only, as is standard
    decay_bias_and_norm: bool = False
    # with decay_bias_and_norm and norm_lr_scale: batch-norm parameters decay by the weights' fraction per step
    # (airbench's), not norm_lr_scale times it (SGD, AdamW: the coefficient divided by norm_lr_scale)
    decay_per_step: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    # learning-rate multiplier for batch-norm parameters (airbench trains BN biases 64x faster: 94% in
    # 18 instead of 22 epochs); like every 1-D parameter they are not weight-decayed unless decay_bias_and_norm
    norm_lr_scale: float = 1.0


@dataclass(frozen=True)
class ScheduleConfig:
    name: ScheduleName = "none"  # none | step | cosine | onecycle | plateau
    step_size: int = 1  # epochs between decays (step)
    gamma: float = 0.1  # decay factor (step; plateau: the factor on a plateau)
    patience: int = 2  # plateau: epochs without improvement of train.monitor before the rate is cut
    warmup_epochs: float = 0.0  # linear warm-up before any schedule (onecycle: unused, it has pct_start)
    min_lr: float = 0.0  # floor (cosine)
    pct_start: float = 0.25  # onecycle: share of training spent warming up to optim.lr
    div_factor: float = 25.0  # onecycle: starts at optim.lr / div_factor
    final_div_factor: float = 1e4  # onecycle: ends at the start lr / final_div_factor
    anneal: Anneal = "cos"  # onecycle: cos | linear, the shape of both ramps
    # onecycle: cycle momentum (SGD) or beta1 (Adam) between 0.85 and 0.95 the other way round to the
    # learning rate, as fastai does; off by default, so that optim.momentum / betas are what is used
    cycle_momentum: bool = False


@dataclass(frozen=True)
class EarlyStopConfig:
    patience: int | None = None  # epochs without improvement before stopping; None = off
    min_delta: float = 0.0


@dataclass(frozen=True)
class ClipConfig:
    norm: float | None = None  # rescale the gradient when its global L2 norm exceeds this
    value: float | None = None  # clamp every gradient element to [-value, value]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 512
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    monitor: Monitor = "val_acc"  # val_acc | val_loss: picks the best epoch
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    label_smoothing: float = 0.0
    # weighted cross-entropy: none | balanced (n / (classes * count), scikit-learn's) | a list, one per class
    class_weights: ClassWeights | tuple[float, ...] = "none"
    accumulate: int = 1  # micro-batches of train.batch_size per optimizer step (gradient accumulation)
    clip_grad: ClipConfig = field(default_factory=ClipConfig)  # {norm: x} or {value: x}
    calibrate: bool = False  # fit a temperature on the validation split after training
    log_every: int = 20  # steps between training-loss rows in steps.csv
    limit_batches: int | None = None  # debugging: at most this many batches per epoch
    amp: Amp = "auto"  # auto | off | bf16 | fp16 (auto = bf16 on CUDA, off on CPU)
    compile: bool = False
    # NHWC memory format: auto | on | off. auto = on where it is faster: on CUDA for any conv net; on CPU
    # when the widest conv has >= 32 channels (1.1-1.9x faster here); narrower nets such as LeNet-5 stay NCHW
    # (with batch norm 2x faster: PyTorch's CPU batch norm is 2-3x slower in NHWC).
    channels_last: Switch = "auto"
    ema: float | None = None  # EMA decay of weights (e.g. 0.999); None = off
    # test-time augmentation of the final evaluation (and `cnnlab eval`, predictions): none | flip (mean of the
    # image's and its mirror's logits) | airbench (mirror x {none, two 1-pixel reflect-padded shifts}, weights
    # 0.25 per untranslated view, 0.125 per shifted one); null = flip when tta_flip, else none
    tta: TtaMode | None = None
    tta_flip: bool = False  # the older spelling of `tta: flip`
    tta_every_epoch: bool = False  # also apply train.tta at every epoch's validation (off: only the final evaluation)
    lookahead: bool = False  # airbench's lookahead averaging of weights over the last 70% of training
    lookahead_start: float = 0.3  # where the lookahead averaging starts, a fraction of the training steps (0 = step 0)
    deterministic: bool = False
    checkpoint_every_steps: int | None = None  # also save last.pt every N steps
    progress: Progress = "auto"  # auto | bar | lines | off
    threads: int | None = None  # torch.set_num_threads; None = one per core not busy now (cnnlab/threads.py)


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs"
    name: str | None = None  # default: the config file's stem
    report: bool = True  # write plots + report.html at the end
    tensorboard: bool = True  # live scalars in RUN/tensorboard (rank 0) when tensorboard is installed


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    # studies (see experiment.py): named override sets, a grid, and seeds per variation
    variations: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    repeats: int = 1
    baseline: str | None = None
    # a hyperparameter search over the runs of a study (SearchConfig below; studies/search.py), {} = none
    search: dict = field(default_factory=dict)


SamplerName = Literal["tpe", "random", "grid"]
PrunerName = Literal["none", "median", "halving"]
Direction = Literal["auto", "maximize", "minimize"]
SPACE_KINDS = ("loguniform", "uniform", "int", "categorical")  # `search.space.<dotted key>: {<kind>: ...}`
EPOCH_METRICS = ("val_acc", "val_loss", "train_acc", "train_loss")  # history.csv columns, known every epoch


@dataclass(frozen=True)
class SearchConfig:
    """`search:` in a study config: which settings to try (`space`), how many trials, what to optimise, and
    how (Optuna's samplers and pruners). Each trial is a run folder of the study (studies/search.py)."""

    space: dict = field(default_factory=dict)  # dotted key -> {loguniform: [lo, hi]} | {uniform: [lo, hi]} |
    # {int: [lo, hi], step: 1, log: false} | {categorical: [a, b, ...]} (a plain list is categorical too)
    trials: int = 20
    objective: str = "val_acc"  # a history.csv column at the best epoch (val_acc, val_loss, train_acc,
    # train_loss) or a metrics.json number (best_val_acc, test.accuracy, test.macro.f1, ...)
    direction: Direction = "auto"  # auto: minimize a loss or an error (ece), else maximize
    sampler: SamplerName = "tpe"  # tpe | random | grid (every combination of categorical values)
    pruner: PrunerName = "none"  # none | median | halving (successive halving), on the per-epoch objective
    startup_trials: int = 5  # median: trials finished before any is pruned
    warmup_epochs: int = 0  # median: epochs every trial runs before it can be pruned
    reduction_factor: int = 3  # halving: a trial goes on past a rung when in the best 1/reduction_factor
    seed: int | None = None  # the sampler's seed; null = train.seed
    storage: str | None = None  # null: <study>/search.journal; a journal file, or a database URL
    # (sqlite:///x.db, postgresql://...) every node reaches, for --executor ray across machines


def search_config(cfg: Config) -> SearchConfig | None:
    """The study's search (validated, errors naming `search.<key>`), or None when it has none."""
    if not cfg.search:
        return None
    s = _build(SearchConfig, cfg.search, "search")
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


# ----------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks that name the key


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if isinstance(value, float) and not math.isfinite(value):  # .inf / .nan: every number here is finite
        raise ConfigError(f"{key}={value!r}: must be a finite number")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{key}: must not be empty (null)")
        errors = []
        # try bool/int before float so that 5000 stays an int count
        for opt in sorted((o for o in options if o is not type(None)), key=lambda o: o is float):
            try:
                return _coerce(value, opt, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # one type besides null (`X | None`): its own message (a Literal's choices)
            raise errors[0]
        names = " or ".join(_type_name(o) for o in options if o is not type(None))
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if all(isinstance(c, str) for c in choices):
            value = _coerce(value, str, key)  # `amp: off` (YAML 1.1 reads a boolean) means "off"
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}.{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of settings, got {value!r}")
        return _build(tp, value, key)
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        item_tp = args[0] if args else Any
        return tuple(_coerce(v, args[i] if args and args[-1] is not Ellipsis else item_tp, f"{key}[{i}]")
                     for i, v in enumerate(value))
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and tp is int and abs(value) >= 1:
            return int(value)
        raise ConfigError(f"{key}: expected a whole number, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):  # a number given as text: "0.5", "1e-5"
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads `off` / `on` as booleans: `amp: off` means "off"
            return "on" if value else "off"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected text, got {value!r}")
    return value


def _all_keys(cls: type = None, prefix: str = "") -> list[str]:
    """Every dotted key of the config (`optim.lr`, `train.early_stop.patience`, ...)."""
    cls = cls or Config
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        out += _all_keys(tp, key + ".") if dataclasses.is_dataclass(tp) else [key]
    return out


def _unknown_key(key: str, k: str, prefix: str, names: list[str]) -> str:
    # a key that exists as it is in another section (`epochs` for train.epochs, `lr` for optim.lr) beats a
    # spelling near a sibling (`epochs` ~ `search`); then a misspelt sibling; then a misspelt key anywhere
    leaf = str(key).split(".")[-1]
    full = _all_keys()
    same = [x for x in full if x.split(".")[-1] == leaf and x != key]
    close = difflib.get_close_matches(str(k), names, n=1, cutoff=0.5)
    if same:
        hint = f" Did you mean {' or '.join(repr(x) for x in same[:3])}?"
    elif close:
        hint = f" Did you mean {(prefix + '.' if prefix else '') + close[0]!r}?"
    else:
        near = [x for x in full if difflib.get_close_matches(leaf, [x.split(".")[-1]], cutoff=0.8)]
        hint = f" Did you mean {' or '.join(repr(x) for x in near[:3])}?" if near else ""
    return f"unknown key {key!r}.{hint} Known keys here: {', '.join(names)}."


def _build(cls: type, data: dict, prefix: str = "", problems: list | None = None) -> Any:
    """`cls` from `data`, every problem found (not only the first): raised together as one ConfigError
    whose `problems` lists (key, message) pairs."""
    top = problems is None
    problems = [] if top else problems
    before = len(problems)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            problems.append((key, _unknown_key(key, k, prefix, names)))
            continue
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
            kwargs[k] = _build(hints[k], v, key, problems)
            continue
        try:
            kwargs[k] = _coerce(v, hints[k], key)
        except ConfigError as e:
            problems.append((key, str(e)))
    if top and problems:
        raise _many(problems)
    return cls(**kwargs) if len(problems) == before else None


def _many(problems: list[tuple[str, str]]) -> ConfigError:
    text = problems[0][1] if len(problems) == 1 else \
        f"{len(problems)} problems:\n  " + "\n  ".join(m for _, m in problems)
    e = ConfigError(text)
    e.problems = problems
    return e


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (lists for tuples) of a config, for YAML and JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


# ----------------------------------------------------------------------------------------------
# Values as people write them, and dotted keys (the one definition of each)


class _Loader(yaml.SafeLoader):
    """`yaml.safe_load` that reads `1e-5` as a number. PyYAML follows YAML 1.1, whose floats need a dot
    (`1.0e-5`), so the value people write would arrive as the text "1e-5", in typed fields, options and
    study grids alike; YAML 1.2 (and everyone) reads a number. Every config value is read through it."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))


class _UniqueKeyLoader(_Loader):
    """_Loader that also refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: PyYAML's own error says so
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (lines {first} and "
                                f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, *, unique_keys: bool = False) -> Any:
    """Plain YAML (no Python tags: _Loader is a SafeLoader, only a resolver added) with YAML 1.2 numbers;
    `unique_keys` (config files) also refuses a key given twice in one mapping."""
    loader = (_UniqueKeyLoader if unique_keys else _Loader)(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_value(text: str) -> Any:
    """`key=value` on the command line: the value is read as YAML (`0.1`, `1e-5`, `true`, `[1, 2]`, `null`)."""
    try:
        return load_yaml(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """tree["a"]["b"] = value for "a.b", making the mappings on the way."""
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def section(dotted: str) -> type | None:
    """The config dataclass a dotted key names (`train.early_stop` -> EarlyStopConfig), else None."""
    tp: Any = Config
    for part in dotted.split("."):
        tp = typing.get_type_hints(tp).get(part) if dataclasses.is_dataclass(tp) else None
        if not dataclasses.is_dataclass(tp):
            return None
    return tp


def flatten(tree: dict, prefix: str = "") -> dict:
    """{dotted key: value} of a nested config dict or nested overrides (the inverse of `set_dotted`):
    config sections are opened, a setting whose value is a mapping (model.options, grid) stays whole."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and section(key) is not None:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def apply_overrides(tree: dict, overrides: list[str] | dict | None) -> dict:
    if not overrides:
        return tree
    items = overrides.items() if isinstance(overrides, dict) else []
    if not isinstance(overrides, dict):
        parsed = []
        for o in overrides:
            if "=" not in o:
                raise ConfigError(f"override {o!r} is not of the form key=value (e.g. optim.lr=0.05)")
            k, v = o.split("=", 1)
            parsed.append((k.strip(), parse_value(v)))
        items = parsed
    for k, v in items:
        if not k or any(not part for part in k.split(".")):
            raise ConfigError(f"override key {k!r} is not a dotted key such as optim.lr")
        set_dotted(tree, k, v)
    return tree


# ----------------------------------------------------------------------------------------------
# Loading and validation


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        tree = load_yaml(path.read_text(encoding="utf-8"), unique_keys=True)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                          "save the config as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML (only plain YAML is read, no Python tags): {e}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data:, model:, ...)")
    return tree


MAX_NODES = 100_000  # values in a config once YAML aliases are expanded (a real one has a few hundred)


def check_size(tree: Any, where: str = "config") -> None:
    """Refuse a config whose YAML aliases expand past MAX_NODES values (an "alias bomb": a few hundred
    bytes of `&a [*b, *b, ...]` that would take hours and gigabytes to expand) or refer to themselves."""
    sizes: dict[int, int] = {}
    busy: set[int] = set()

    def size(v: Any) -> int:  # values counted as if every alias were written out, each shared node once
        if not isinstance(v, (dict, list, tuple)):
            return 1
        if id(v) in sizes:
            return sizes[id(v)]
        if id(v) in busy:
            raise ConfigError(f"{where}: a YAML alias refers to the mapping or list that contains it")
        busy.add(id(v))
        n = 1
        for x in (v.values() if isinstance(v, dict) else v):
            n += size(x)
            if n > MAX_NODES:
                raise ConfigError(f"{where}: the config expands to more than {MAX_NODES:,} values once its YAML "
                                  "aliases (*name) are written out; refusing to read it (an alias bomb?)")
        busy.discard(id(v))
        sizes[id(v)] = n
        return n

    size(tree)


_KEY = re.compile(r"^(?:unknown key )?'?([A-Za-z_][\w.]*)")


def from_dict(tree: dict, *, where: str = "config", overridden: tuple[str, ...] = ()) -> Config:
    """A validated Config; errors name `where` (the file), or the command line for the keys in
    `overridden` (the dotted keys that overrides set)."""
    check_size(tree, where)
    try:
        cfg = _build(Config, tree)
        validate(cfg)
    except ConfigError as e:
        problems = getattr(e, "problems", None) or [((_KEY.match(str(e)) or [None, ""])[1], str(e))]

        def blamed(key: str) -> str:
            if any(key == o or key.startswith(o + ".") or o.startswith(key + ".") for o in overridden):
                return "command line"
            return where

        places = {blamed(k) for k, _ in problems}
        if len(places) == 1:
            raise ConfigError(f"{places.pop()}: {e}") from None
        raise ConfigError(f"{len(problems)} problems:\n  " + "\n  ".join(f"{blamed(k)}: {m}" for k, m in problems)) from None
    return cfg


def load(source: str | Path | dict | Config | None = None, overrides: list[str] | dict | None = None) -> Config:
    """A Config from a YAML path, a dict or a Config, with dotted overrides applied."""
    if isinstance(source, Config):
        tree, where = to_dict(source), "config"
    elif isinstance(source, dict):
        tree, where = dict(source), "config"
    elif source is None:
        tree, where = {}, "config"
    else:
        tree, where = read_yaml(source), str(source)
        tree.setdefault("output", {})
        if isinstance(tree["output"], dict):
            tree["output"].setdefault("name", Path(source).stem)
    import copy

    tree = apply_overrides(copy.deepcopy(tree), overrides)
    keys = tuple(overrides) if isinstance(overrides, dict) else tuple(o.split("=", 1)[0].strip() for o in overrides or ())
    return expand_user(from_dict(tree, where=where, overridden=keys if where != "config" else ()))


def expand_user(cfg: Config) -> Config:
    """`~` and `~user` in output.dir and data.root mean a home folder, as in a shell (never a folder named '~')."""
    root = os.path.expanduser(cfg.data.root) if cfg.data.root else cfg.data.root
    out = os.path.expanduser(cfg.output.dir)
    if root == cfg.data.root and out == cfg.output.dir:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=root),
                               output=dataclasses.replace(cfg.output, dir=out))


def replace(cfg: Config, overrides: dict | list[str]) -> Config:
    """A new Config with dotted overrides applied (validated)."""
    return load(cfg, overrides)


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


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
