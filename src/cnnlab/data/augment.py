"""Augmentation policies on whole uint8 batches through torchvision transforms v2, one random draw per image.

A v2 transform called on a (B, C, H, W) batch draws its parameters once and applies them to every
image. Here each image gets its own draw, reproducibly: image g of a global batch is augmented as
the library's own transform does after `torch.manual_seed(seed_g)`, the seeds drawn from the step's
generator (so results depend on (train.seed, step, g) only: the same with any world size, on resume,
on either data path). How each kind runs on a batch:

- RandAugment, TrivialAugmentWide, AutoAugment: each image's ops are drawn by the library's own
  code (`forward` on a zero-stride stand-in of the image's shape, its `_apply_image_or_video_transform`
  recording instead of applying); then, op by op, the images that drew the same (op, magnitude) go
  through the library's op together as one batch: about 20-30 batched calls per op instead of B.
- random_resized_crop, rotation, color_jitter, random_erasing: continuous parameters; the library's
  `forward` draws each image's params (recorded the same way), its `transform` applies them image by
  image (about 0.1-1 ms a 32x32 image on a CPU core).
- MixUp / CutMix: per batch by definition (one lambda, each image mixed with its neighbour):
  v2.MixUp / v2.CutMix on the normalised float batch, returning soft (B, K) targets.

All per-image draws are made first (`draw_policies`), then applied (`apply_drawn`), which uses no random
numbers: the application can run on another thread than the draws (training/feed.py) with the same pixels.
"""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from cnnlab.config import AugmentConfig

if TYPE_CHECKING:
    from torchvision.transforms import v2

SEED_HIGH = 2**62


def _v2():
    """torchvision.transforms.v2, imported when a policy is asked for: importing torchvision loads
    torch._dynamo (about 2 s of CPU a process), which a run without these policies never needs."""
    from torchvision.transforms import v2

    return v2


def _seed(s: int) -> None:
    """torch.manual_seed for the CPU generator the v2 transforms draw from, without its cost of ~1 ms
    (torch.manual_seed also queues seeding for every accelerator type, recording a stack trace each)."""
    torch.default_generator.manual_seed(s)


def per_image_seeds(gen: torch.Generator, total: int, mine: slice) -> list[int]:
    """One seed per image of the global batch (this slice's rows), drawn from the step's generator."""
    return torch.randint(0, SEED_HIGH, (total,), generator=gen)[mine].tolist()


# ---- the library transforms a config asks for


def _policy(aug: AugmentConfig) -> v2.Transform | None:
    if aug.randaugment is None and not aug.trivialaugment and aug.autoaugment is None:
        return None
    v2 = _v2()
    if aug.randaugment is not None:
        return v2.RandAugment(num_ops=aug.randaugment.num_ops, magnitude=aug.randaugment.magnitude)
    if aug.trivialaugment:
        return v2.TrivialAugmentWide()
    if aug.autoaugment is not None:
        return v2.AutoAugment(v2.AutoAugmentPolicy(aug.autoaugment))
    return None


def per_image_transforms(aug: AugmentConfig, size: tuple[int, int]) -> list[tuple[str, v2.Transform]]:
    """The transforms with continuous parameters, in the order they run, each applied image by image."""
    v2 = _v2()
    out = []
    if aug.random_resized_crop is not None:
        r = aug.random_resized_crop
        out.append(("random_resized_crop", v2.RandomResizedCrop(size, scale=tuple(r.scale), ratio=tuple(r.ratio),
                                                                antialias=True)))
    if aug.rotation:
        out.append(("rotation", v2.RandomRotation(aug.rotation)))
    return out


def after_policy_transforms(aug: AugmentConfig) -> list[tuple[str, v2.Transform]]:
    v2 = _v2()
    out = []
    cj = aug.color_jitter
    if cj:
        b, c, s, h = (cj, cj, cj, 0.0) if isinstance(cj, float) else cj
        out.append(("color_jitter", v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)))
    if aug.random_erasing:
        out.append(("random_erasing", v2.RandomErasing(p=aug.random_erasing, value=0)))
    return out


def library_pipeline(aug: AugmentConfig, size: tuple[int, int]) -> list[tuple[str, v2.Transform]]:
    """Every per-image transform `draw_policies` draws for and `apply_drawn` applies, in their order (the
    reference for tests and the benchmark's plain pipeline)."""
    policy = _policy(aug)
    return per_image_transforms(aug, size) + ([("policy", policy)] if policy else []) + after_policy_transforms(aug)


# ---- per-image draws, then their (deterministic) application
#
# Every random number is drawn first (`draw_policies`, on the thread that owns the global generator the
# library draws from); applying the draws (`apply_drawn`) uses none, so it may run on another thread
# (training/feed.py runs it one batch ahead in a background thread) and gives the same pixels.


@lru_cache(maxsize=8)
def _recorder_class(cls: type) -> type:
    """`cls` (an auto-augment policy) whose op application records (op, magnitude) instead of applying."""

    def record(self, image, transform_id, magnitude, interpolation, fill):
        self.drawn.append((transform_id, magnitude))
        return image

    # the magnitude tables (a torch.linspace per draw) depend only on (bins, height, width), never on the
    # random state: computed once, the draws stay the library's own
    space = {k: (lru_cache(maxsize=16)(fn), signed) for k, (fn, signed) in cls._AUGMENTATION_SPACE.items()}
    return type(f"Recording{cls.__name__}", (cls,), {"_apply_image_or_video_transform": record,
                                                     "_AUGMENTATION_SPACE": space})


@lru_cache(maxsize=16)
def _params_recorder_class(cls: type) -> type:
    """`cls` (a v2 transform) whose `transform(inpt, params)` records the params its `forward` drew instead of
    applying them (no record: a random-apply transform that drew 'skip')."""

    def record(self, inpt, params):
        self.drawn = params
        return inpt

    return type(f"Recording{cls.__name__}", (cls,), {"transform": record})


def _is_policy(t: v2.Transform) -> bool:
    v2 = _v2()
    return isinstance(t, (v2.RandAugment, v2.TrivialAugmentWide, v2.AutoAugment))


def _recorder(t: v2.Transform) -> v2.Transform:
    cls = _recorder_class(type(t)) if _is_policy(t) else _params_recorder_class(type(t))
    rec = cls.__new__(cls)
    rec.__dict__.update(t.__dict__)  # the same settings (and nn.Module state) as the transform itself
    rec.drawn = []
    return rec


def draw_each(t: v2.Transform, shape: tuple[int, int, int], seeds: list[int]) -> list:
    """What `torch.manual_seed(seeds[i]); t(image)` draws for each image of (C, H, W) `shape`: per image the
    op list [(op, magnitude), ...] of a policy (RandAugment, TrivialAugmentWide, AutoAugment), or the params
    dict of any other v2 transform (None where a random-apply transform skips the image). The library's own
    `forward` draws, on a zero-stride stand-in of the image's shape (no pixels are touched)."""
    stand_in = torch.zeros((), dtype=torch.uint8).expand(*shape)
    rec = _recorder(t)
    policy = _is_policy(t)
    out = []
    with torch.random.fork_rng(devices=[]):
        for s in seeds:
            _seed(s)
            rec.drawn = [] if policy else None
            rec(stand_in)
            out.append(rec.drawn)
    return out


def apply_ops(x: torch.Tensor, policy: v2.Transform, ops: list) -> torch.Tensor:
    """A policy's drawn op lists on uint8 (B, C, H, W) `x`, op by op, the images that drew the same
    (op, magnitude) going through the library's op together as one batch."""
    x = x.clone()
    for k in range(max((len(o) for o in ops), default=0)):
        groups: dict[tuple[str, float], list[int]] = {}
        for i, o in enumerate(ops):
            if len(o) > k and o[k][0] != "Identity":
                groups.setdefault(o[k], []).append(i)
        for (op, magnitude), rows in groups.items():
            idx = torch.tensor(rows, device=x.device)
            x[idx] = policy._apply_image_or_video_transform(x[idx], op, magnitude, interpolation=policy.interpolation,
                                                            fill=policy._fill)
    return x


def apply_params(x: torch.Tensor, t: v2.Transform, params: list) -> torch.Tensor:
    """A v2 transform's drawn params on each image of (B, C, H, W) `x`: `t.transform`, as its `forward` does."""
    out = x.clone()
    for i, p in enumerate(params):
        if p is not None:
            out[i] = t.transform(x[i], p)
    return out


def has_policies(aug: AugmentConfig) -> bool:
    return bool(_policy(aug) is not None or aug.random_resized_crop is not None or aug.rotation
                or aug.color_jitter or aug.random_erasing)


def draw_policies(aug: AugmentConfig, shape: tuple[int, int, int], gen: torch.Generator, *, mine: slice,
                  total: int) -> list[tuple[v2.Transform, list]]:
    """Every draw of the v2 transforms for images of (C, H, W) `shape`: [(transform, per-image draws), ...]
    in the order they apply, for `apply_drawn`."""
    policy = _policy(aug)
    steps = [t for _, t in per_image_transforms(aug, (int(shape[-2]), int(shape[-1])))]
    steps += ([policy] if policy is not None else []) + [t for _, t in after_policy_transforms(aug)]
    return [(t, draw_each(t, shape, per_image_seeds(gen, total, mine))) for t in steps]


def apply_drawn(x: torch.Tensor, drawn: list[tuple[v2.Transform, list]]) -> torch.Tensor:
    """`draw_policies`' draws applied to uint8 (B, C, H, W) `x`; no random numbers are used."""
    for t, d in drawn:
        x = apply_ops(x, t, d) if _is_policy(t) else apply_params(x, t, d)
    return x


# ---- MixUp / CutMix


def mixer(aug: AugmentConfig, num_classes: int) -> v2.Transform | None:
    """v2.MixUp / v2.CutMix (one of the two at random, as timm, when both are set), or None."""
    if not (aug.mixup or aug.cutmix):
        return None
    v2 = _v2()
    ts = []
    if aug.mixup:
        ts.append(v2.MixUp(alpha=aug.mixup, num_classes=num_classes))
    if aug.cutmix:
        ts.append(v2.CutMix(alpha=aug.cutmix, num_classes=num_classes))
    if not ts:
        return None
    return ts[0] if len(ts) == 1 else v2.RandomChoice(ts)


def mix_batch(x: torch.Tensor, y: torch.Tensor, aug: AugmentConfig, gen: torch.Generator,
              num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp / CutMix of a float (B, C, H, W) batch and its int64 labels -> (images, (B, K) soft targets
    that sum to 1); unchanged when neither is set. One draw per batch, seeded from the step's generator."""
    m = mixer(aug, num_classes)
    if m is None or len(y) < 2:
        return x, y
    seed = int(torch.randint(0, SEED_HIGH, (1,), generator=gen))
    with torch.random.fork_rng(devices=[]):
        _seed(seed)
        return m(x, y)


def hard_targets(y: torch.Tensor) -> torch.Tensor:
    """Class indices to score accuracy against: the labels, or the largest share of a mixed (soft) target."""
    return y if y.ndim == 1 else y.argmax(1)
