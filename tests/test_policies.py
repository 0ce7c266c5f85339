"""Augmentation policies (torchvision transforms v2) on whole batches: every image equals the library's own
transform on that image with the same seed, images get their own draws (the library on a batch shares one),
the draws do not depend on how a batch is split across ranks, and MixUp/CutMix give soft targets that sum
to 1 and that the loss and the training loop take."""
import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from cnnlab import config as C
from cnnlab.data import augment as A
from cnnlab.data.loader import augment_batch

B, S = 24, 16


def _batch(seed: int = 0) -> torch.Tensor:
    """(B, 3, S, S) uint8 with structure (gradients + noise), so geometric and colour ops all change it."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 255, S).view(1, 1, 1, S) * torch.linspace(0.2, 1, S).view(1, 1, S, 1)
    noise = torch.randint(0, 60, (B, 3, S, S), generator=g)
    return (ramp * torch.rand(B, 3, 1, 1, generator=g) + noise).clamp(0, 255).to(torch.uint8)


def _aug(**kw) -> C.AugmentConfig:
    return C.load(None, {f"data.augment.{k}": v for k, v in kw.items()}).data.augment


POLICIES = {
    "randaugment": dict(randaugment={"num_ops": 2, "magnitude": 9}),
    "randaugment_strong": dict(randaugment={"num_ops": 3, "magnitude": 20}),
    "trivialaugment": dict(trivialaugment=True),
    "autoaugment_cifar10": dict(autoaugment="cifar10"),
    "autoaugment_imagenet": dict(autoaugment="imagenet"),
    "random_resized_crop": dict(random_resized_crop={"scale": [0.3, 1.0], "ratio": [0.75, 1.33]}),
    "rotation": dict(rotation=30.0),
    "color_jitter": dict(color_jitter=[0.4, 0.4, 0.4, 0.1]),
    "random_erasing": dict(random_erasing=0.7),
    "everything": dict(random_resized_crop={"scale": [0.5, 1.0]}, rotation=10.0, randaugment={"num_ops": 2},
                       color_jitter=0.3, random_erasing=0.5, hflip=True, crop_padding=2, cutout=4),
}


def _library_reference(x: torch.Tensor, aug: C.AugmentConfig, seed: int) -> torch.Tensor:
    """The batch as the library transforms give it image by image, with the seeds augment_batch draws
    (the step generator's draws in their fixed order: flip, crop, cutout, then one seed per transform)."""
    gen = torch.Generator().manual_seed(seed)
    ref = augment_batch(x, C.load(None, {"data.augment.hflip": aug.hflip, "data.augment.crop_padding": aug.crop_padding,
                                         "data.augment.cutout": 0}).data.augment, gen)
    if aug.cutout:  # its draws come before the policies' seeds
        cy = torch.randint(0, S, (B,), generator=gen)
        cx = torch.randint(0, S, (B,), generator=gen)
    steps = A.library_pipeline(aug, (S, S))
    for _, t in steps:
        seeds = torch.randint(0, A.SEED_HIGH, (B,), generator=gen).tolist()
        out = []
        for i, s in enumerate(seeds):
            torch.manual_seed(s)
            out.append(t(ref[i]))
        ref = torch.stack(out)
    if aug.cutout:
        for i in range(B):  # Cutout: the square (clipped at the border) set to zero
            y0, x0 = int(cy[i]) - aug.cutout // 2, int(cx[i]) - aug.cutout // 2
            ref[i, :, max(0, y0):max(0, y0 + aug.cutout), max(0, x0):max(0, x0 + aug.cutout)] = 0
    return ref


@pytest.mark.parametrize("name", list(POLICIES))
def test_each_image_equals_the_library_transform_with_its_seed(name):
    aug = _aug(**POLICIES[name])
    x = _batch()
    ours = augment_batch(x, aug, torch.Generator().manual_seed(7))
    ref = _library_reference(x, aug, 7)
    assert ours.dtype == torch.uint8 and ours.shape == x.shape
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, x)  # it did something


@pytest.mark.parametrize("name", ["randaugment", "trivialaugment", "autoaugment_cifar10", "random_resized_crop",
                                  "rotation", "color_jitter", "random_erasing"])
def test_identical_images_in_a_batch_get_their_own_draws(name):
    """The library on a batch draws once for all images; augment_batch draws per image."""
    aug = _aug(**POLICIES[name])
    same = _batch()[:1].expand(B, -1, -1, -1).contiguous()
    torch.manual_seed(0)
    shared = dict(A.library_pipeline(aug, (S, S)))
    lib = next(iter(shared.values()))(same)
    assert all(torch.equal(lib[0], lib[i]) for i in range(B))  # the pitfall this module avoids
    ours = augment_batch(same, aug, torch.Generator().manual_seed(3))
    distinct = len({ours[i].numpy().tobytes() for i in range(B)})
    assert distinct >= B // 3, f"only {distinct} distinct outputs of {B} identical inputs"


def test_randaugment_op_choice_is_uniform_over_images():
    """Across 600 images, the first op RandAugment draws is uniform over its 14 ops (chi-square)."""
    from scipy.stats import chisquare

    pol = v2.RandAugment(num_ops=1)
    rec = A._recorder(pol)
    stand_in = torch.zeros((), dtype=torch.uint8).expand(3, S, S)
    ops = []
    for s in A.per_image_seeds(torch.Generator().manual_seed(1), 600, slice(None)):
        torch.default_generator.manual_seed(s)  # torch.manual_seed's CPU part (without its ~1 ms elsewhere)
        rec.drawn = []
        rec(stand_in)
        ops.append(rec.drawn[0][0])
    names = list(pol._AUGMENTATION_SPACE)
    counts = np.array([ops.count(n) for n in names])
    assert counts.sum() == 600 and chisquare(counts).pvalue > 1e-3


def test_a_rank_slice_is_augmented_as_in_the_whole_batch():
    aug = _aug(**POLICIES["everything"])
    x = _batch(1)
    whole = augment_batch(x, aug, torch.Generator().manual_seed(5))
    part = augment_batch(x[8:16], aug, torch.Generator().manual_seed(5), offset=8, total=B)
    assert torch.equal(part, whole[8:16])


@pytest.mark.parametrize("kw", [dict(mixup=0.4), dict(cutmix=1.0), dict(mixup=0.2, cutmix=1.0)])
def test_mixup_cutmix_soft_targets_and_the_loss(kw):
    aug = _aug(**kw)
    x = _batch().float()
    y = torch.arange(B) % 5
    xm, ym = A.mix_batch(x, y, aug, torch.Generator().manual_seed(0), 5)
    assert ym.shape == (B, 5) and torch.allclose(ym.sum(1), torch.ones(B))
    assert not torch.equal(xm, x) and (ym > 0).sum(1).max() == 2  # each image mixed with one other
    # the same draw as the library's own transform with the seed mix_batch takes from the generator
    seed = int(torch.randint(0, A.SEED_HIGH, (1,), generator=torch.Generator().manual_seed(0)))
    torch.manual_seed(seed)
    xr, yr = A.mixer(aug, 5)(x, y)
    assert torch.equal(xm, xr) and torch.equal(ym, yr)
    # the training loss takes soft targets: -sum(target * log_softmax) averaged
    logits = torch.randn(B, 5)
    want = -(ym * logits.log_softmax(1)).sum(1).mean()
    assert torch.allclose(torch.nn.CrossEntropyLoss()(logits, ym), want)
    assert torch.equal(A.hard_targets(ym), ym.argmax(1))


def test_training_with_randaugment_and_mixup_runs_and_logs_accuracy(tmp_path):
    import cnnlab
    from cnnlab import rundir as R

    cfg = {"data": {"name": "digits", "augment": {"randaugment": {"num_ops": 1}, "mixup": 0.2, "cutmix": 1.0}},
           "model": {"name": "layers", "layers": [{"conv": {"out": 8, "k": 3, "padding": 1}}, "relu", {"maxpool": 2},
                                                  "flatten", {"linear": "classes"}]},
           "train": {"epochs": 1, "batch_size": 64, "limit_batches": 4, "progress": "off"},
           "output": {"dir": str(tmp_path), "name": "mix", "report": False}}
    run = cnnlab.train(cfg)
    hist = R.read_csv(run.dir / R.HISTORY)
    assert len(hist) == 1 and 0 <= float(hist[0]["train_acc"]) <= 1 and np.isfinite(float(hist[0]["train_loss"]))


@pytest.mark.parametrize("override, says", [
    ({"data.augment.randaugment.magnitude": 40}, "data.augment.randaugment.magnitude=40: must be in 0..30"),
    ({"data.augment.trivialaugment": True, "data.augment.autoaugment": "cifar10"}, "choose one augmentation policy"),
    ({"data.augment.autoaugment": "cifar"}, "'cifar' is not one of cifar10, imagenet, svhn. Did you mean 'cifar10'?"),
    ({"data.augment.random_resized_crop.scale": [0.5, 2]}, "random_resized_crop.scale=[0.5, 2.0]: needs 0 < low"),
    ({"data.augment.random_erasing": 1.5}, "data.augment.random_erasing=1.5: a probability"),
    ({"data.augment.mixup": -1}, "data.augment.mixup=-1.0: the alpha must be >= 0"),
])
def test_bad_augmentation_settings_are_refused_naming_the_key(override, says):
    with pytest.raises(C.ConfigError) as e:
        C.load(None, override)
    assert says in str(e.value)
