"""The config's shape: the frozen dataclasses of every section (their fields, defaults and comments), the
`Literal` choices of each key that takes one of a few words, the limits and names other modules share
(MAX_IMAGE_SIDE, SPACE_KINDS, EPOCH_METRICS), SearchConfig, and ConfigError. Imports only cnnlab.errors.
The choices are defined here, once, and checked by type in coerce.py; the builders (optimizers, weight init,
padding, ...) take their names from them (tests/test_architecture.py checks that each builder covers every
choice)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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
