"""The fast path's whole-batch augmentation has the same distribution as torchvision's per-image
RandomCrop(padding) + RandomHorizontalFlip, both data paths (in memory and streamed through a DataLoader)
give the same augmented batches, and the normalisation equals torchvision's ToTensor + Normalize."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from PIL import Image
from scipy.stats import binomtest, chi2_contingency, chisquare

from cnnlab import config as C
from cnnlab.data.loader import Batches, Normalizer, augment_batch, epoch_order
from cnnlab.data.pipeline import prepare

H = W = 8
P = 2
N = 4000


def _probe() -> torch.Tensor:
    """(3, 8, 8) uint8 with every pixel distinct and non-zero, so a crop+flip can be read back from the output."""
    v = torch.arange(1, H * W + 1, dtype=torch.uint8).view(H, W)
    return torch.stack([v, v + 64, v + 128])


def _candidates(img: torch.Tensor, mode: str = "constant") -> dict:
    """Every (flip, dy, dx) crop of the image padded by torchvision (zeros, edge or reflect), as its
    RandomCrop + RandomHorizontalFlip make them: crop at (dy, dx), then flip."""
    padded = T.functional.pad(img, [P], padding_mode=mode)
    out = {}
    for dy in range(2 * P + 1):
        for dx in range(2 * P + 1):
            crop = padded[:, dy:dy + H, dx:dx + W]
            for flip in (0, 1):
                out[(flip, dy, dx)] = crop.flip(2) if flip else crop
    return out


def _decode(outputs: torch.Tensor, cands: dict) -> np.ndarray:
    keys = list(cands)
    stack = torch.stack([cands[k] for k in keys]).view(len(keys), -1)
    found = []
    for o in outputs:
        hit = (stack == o.reshape(1, -1)).all(1).nonzero()
        assert len(hit) == 1, "an output that is no single crop+flip of the input"
        found.append(keys[hit.item()])
    return np.array(found)  # (N, 3): flip, dy, dx


@pytest.mark.parametrize("mode", ["constant", "edge", "reflect"])
def test_fast_path_augmentation_has_torchvision_distribution(mode):
    img = _probe()
    cands = _candidates(img, mode)
    aug = C.load(None, ["data.augment.hflip=true", f"data.augment.crop_padding={P}",
                        f"data.augment.crop_padding_mode={mode}"]).data.augment
    ours = _decode(augment_batch(img.expand(N, -1, -1, -1).contiguous(), aug, torch.Generator().manual_seed(0)),
                   cands)
    torch.manual_seed(0)
    tv = T.Compose([T.RandomCrop(H, padding=P, padding_mode=mode), T.RandomHorizontalFlip()])
    theirs = _decode(torch.stack([tv(img) for _ in range(N)]), cands)

    for name, d in (("cnnlab", ours), ("torchvision", theirs)):
        assert binomtest(int(d[:, 0].sum()), N, 0.5).pvalue > 1e-3, (name, d[:, 0].mean())  # flip rate 0.5
        for col in (1, 2):  # offsets uniform over 0..2P
            counts = np.bincount(d[:, col], minlength=2 * P + 1)
            assert len(counts) == 2 * P + 1 and chisquare(counts).pvalue > 1e-3, (name, col, counts)
    # and the two are the same distribution (flip x dy x dx jointly, 50 cells)
    table = np.zeros((2, 2 * (2 * P + 1) ** 2))
    for row, d in enumerate((ours, theirs)):
        np.add.at(table[row], d[:, 0] * (2 * P + 1) ** 2 + d[:, 1] * (2 * P + 1) + d[:, 2], 1)
    assert chi2_contingency(table).pvalue > 1e-3
    # flip is independent of the offsets in ours, as in torchvision's
    flips = np.zeros((2, 2 * P + 1))
    np.add.at(flips, (ours[:, 0], ours[:, 2]), 1)
    assert chi2_contingency(flips).pvalue > 1e-3


def test_reflect_padding_wider_than_the_image_is_refused_before_the_run_starts(tmp_path):
    """Reflection needs padding below the image side: 8x8 digits with padding 8 fail with exit 2, no run folder."""
    from inproc import run_cli  # in this process, through the CLI's own main

    repo = Path(__file__).resolve().parents[1]
    r = run_cli("train", "examples/quickstart.yaml", f"output.dir={tmp_path}", "data.augment.crop_padding=8",
                "data.augment.crop_padding_mode=reflect", cwd=repo)
    assert r.returncode == 2 and "data.augment.crop_padding=8" in r.stderr and "8x8" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []
    r = run_cli("train", "examples/quickstart.yaml", f"output.dir={tmp_path}", "data.augment.crop_padding_mode=mirror",
                cwd=repo)
    assert r.returncode == 2 and "data.augment.crop_padding_mode" in r.stderr and "'mirror'" in r.stderr, r.stderr


def test_no_augmentation_is_the_identity():
    x = torch.randint(0, 256, (16, 3, H, W), dtype=torch.uint8)
    aug = C.load(None, ["data.augment.hflip=false", "data.augment.crop_padding=0"]).data.augment
    assert torch.equal(augment_batch(x, aug, torch.Generator().manual_seed(0)), x)


def test_memory_and_stream_paths_augment_and_normalise_identically(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (tmp_path / "ds" / c).mkdir(parents=True)
        for i in range(15):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "ds" / c / f"{i}.png")
    d = C.load(None, ["data.name=folder", f"data.root={tmp_path / 'ds'}", "data.val_split=9",
                      "data.augment.hflip=true", "data.augment.crop_padding=3", "data.augment.cutout=4"]).data
    mem, stream = prepare(d, want_memory=True), prepare(d, want_memory=False)
    assert mem.train.images is not None and stream.train.images is None
    assert np.allclose(mem.mean, stream.mean, atol=1e-6) and np.allclose(mem.std, stream.std, atol=1e-6)
    order = epoch_order(len(mem.train), seed=3, epoch=1)
    kw = dict(batch_size=8, device=torch.device("cpu"), channels=3, size=12)
    norm_m, norm_s = Normalizer(mem.mean, mem.std, "cpu"), Normalizer(stream.mean, stream.std, "cpu")
    n = 0
    for step, ((xa, _, _), (xb, _, _)) in enumerate(zip(Batches(mem.train, **kw).iterate(order),
                                                        Batches(stream.train, num_workers=2, **kw).iterate(order))):
        ga, gb = torch.Generator().manual_seed(step), torch.Generator().manual_seed(step)
        a, b = norm_m(augment_batch(xa, d.augment, ga)), norm_s(augment_batch(xb, d.augment, gb))
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        n += len(xa)
    assert n == len(mem.train)


def test_normalisation_equals_torchvision_to_tensor_and_normalize():
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    x = torch.randint(0, 256, (4, 3, 9, 9), dtype=torch.uint8)
    ref = T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])
    ours = Normalizer(mean, std, "cpu", channels_last=True)(x)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours, torch.stack([ref(i) for i in x]), rtol=1e-5, atol=1e-5)
    pil = Image.fromarray(x[0].permute(1, 2, 0).numpy())  # the classic ToTensor path from a PIL image
    import torchvision.transforms as T1
    classic = T1.Compose([T1.ToTensor(), T1.Normalize(mean, std)])(pil)
    torch.testing.assert_close(ours[0], classic, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [1, 4])
def test_crop_offsets_cover_exactly_minus_p_to_p(p):
    img = torch.arange(1, 65, dtype=torch.uint8).view(1, 8, 8).expand(3, -1, -1).contiguous()
    aug = C.load(None, ["data.augment.hflip=false", f"data.augment.crop_padding={p}"]).data.augment
    out = augment_batch(img.expand(600, -1, -1, -1).contiguous(), aug, torch.Generator().manual_seed(1))
    # where the original top-left pixel (value 1) landed: shift in -p..p on each axis (or cropped away)
    shifts = set()
    for o in out[:, 0]:
        pos = (o == 1).nonzero()
        if len(pos):
            shifts.add((pos[0, 0].item(), pos[0, 1].item()))
    assert shifts == {(i, j) for i in range(p + 1) for j in range(p + 1)}  # only the non-negative ones keep it
