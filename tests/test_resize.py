"""data.resize: squash | crop | pad, for files and for in-memory images, and the evaluation recipe of
pretrained weights (data.eval_resize_size: shorter side, then center crop) for val/test and predict."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from cnnlab import config as C
from cnnlab.data.base import decode, decode_image, eval_resize
from cnnlab.data.pipeline import prepare, resize_images

W, H, S = 40, 20, 16  # a wide image: 40 x 20 (width x height) to 16 x 16


def _wide() -> Image.Image:
    """Left half red (200, 0, 0), right half blue (0, 0, 200), a green column at the far left and right edges."""
    a = np.zeros((H, W, 3), np.uint8)
    a[:, :W // 2, 0] = 200
    a[:, W // 2:, 2] = 200
    a[:, :2, 1] = a[:, -2:, 1] = 250
    return Image.fromarray(a)


def test_squash_keeps_the_whole_image():
    t = decode_image(_wide(), 3, S, "squash")
    assert t.shape == (3, S, S) and t[1, :, 0].min() > 100 and t[1, :, -1].min() > 100  # both edges kept


def test_crop_is_torchvisions_resize_then_center_crop():
    t = decode_image(_wide(), 3, S, "crop")
    ref = v2.functional.pil_to_tensor(v2.CenterCrop(S)(v2.Resize(S, antialias=True)(_wide())))
    assert torch.equal(t, ref)
    assert t[1].max() == 0  # the green edges are cut off
    assert t[0, :, 0].min() > 150 and t[2, :, -1].min() > 150  # red left, blue right of the centre


def test_pad_adds_black_bands_and_keeps_the_whole_image():
    t = decode_image(_wide(), 3, S, "pad")
    band = S * (W - H) // 2 // W  # 10 of 40 rows top and bottom -> 4 of 16
    assert t.shape == (3, S, S)
    assert t[:, :band - 1].max() == 0 and t[:, S - band + 1:].max() == 0  # black above and below
    assert t[1, band + 1:S - band - 1, 0].min() > 100  # the green edge survives
    assert t[0, S // 2, 2] > 100 and t[2, S // 2, -3] > 100


@pytest.mark.parametrize("mode", ["squash", "crop", "pad"])
def test_in_memory_images_get_the_same_geometry(mode):
    """A tensor set (an official data set's decoded images) resized by mode, as a file would be (within
    interpolation differences of a pixel value or two)."""
    x = v2.functional.pil_to_tensor(_wide())[None].repeat(2, 1, 1, 1)
    ours = resize_images(x, S, (mode, None))
    ref = decode_image(_wide(), 3, S, mode)
    assert ours.shape == (2, 3, S, S)
    assert (ours[0].int() - ref.int()).abs().float().mean() < 6


def test_eval_splits_follow_the_pretrained_recipe(tmp_path):
    """data.eval_resize_size: val/test images get shorter side -> 20, center crop 16 (as weights.transforms()
    does at 256 -> 224), training images data.resize; on both data paths; predict's transform the same."""
    rows = ["path,label,split"]
    for i in range(8):
        _wide().save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{'ab'[i % 2]},{'train' if i < 6 else 'test'}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    d = C.load(None, ["data.name=csv", f"data.root={tmp_path / 'm.csv'}", f"data.image_size={S}",
                      "data.eval_resize_size=20", "data.val_split=2"]).data
    want_eval = v2.functional.pil_to_tensor(v2.CenterCrop(S)(v2.Resize(20, antialias=True)(_wide())))
    want_train = decode_image(_wide(), 3, S, "squash")
    for memory in (True, False):
        sp = prepare(d, want_memory=memory)
        test = sp.test.images[0] if memory else decode(sp.test.files[0], 3, S, *sp.test.resize)
        train = sp.train.images[0] if memory else decode(sp.train.files[0], 3, S, *sp.train.resize)
        assert torch.equal(test, want_eval) and torch.equal(train, want_train)
    assert eval_resize(d) == ("crop", 20)
    from cnnlab.deploy.classifier import Transform

    assert torch.equal(Transform(3, S, (0.5,) * 3, (0.5,) * 3, eval_resize(d)).pixels(tmp_path / "0.png"), want_eval)


def test_pretrained_weights_bring_their_eval_recipe_and_bad_values_are_refused():
    from cnnlab.models import transfer

    cfg = C.load(None, ["model.name=torchvision:resnet18", "model.pretrained=IMAGENET1K_V1"])
    extra = transfer.data_defaults(cfg.model, cfg.data)
    assert extra["image_size"] == 224 and extra["eval_resize_size"] == 256
    with pytest.raises(C.ConfigError, match="data.eval_resize_size"):
        C.load(None, ["data.image_size=32", "data.eval_resize_size=16"])
    with pytest.raises(C.ConfigError, match="data.resize='fit' is not one of squash, crop, pad"):
        C.load(None, ["data.resize=fit"])
