"""Data sources beyond class folders: a CSV/TSV manifest (relative paths, zip members, absolute paths,
rows named in errors) and a Hugging Face data set saved with save_to_disk, through training's prepare,
`cnnlab data stats` and `cnnlab data check`."""
import csv
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnlab import config as C
from cnnlab.data.manifest import ManifestError, csv_manifest
from cnnlab.data.pipeline import open_source, prepare


def _png(value: int, size=(10, 12)) -> bytes:
    b = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(b, "PNG")
    return b.getvalue()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """photos/ with 12 PNGs (values 10*i), a zip with 4 more, and an absolute-path image elsewhere."""
    root = tmp_path_factory.mktemp("manifest")
    (root / "photos").mkdir()
    for i in range(12):
        (root / "photos" / f"{i}.png").write_bytes(_png(10 * i))
    with zipfile.ZipFile(root / "more.zip", "w") as z:
        for i in range(4):
            z.writestr(f"m/{i}.png", _png(200 + i))
    other = tmp_path_factory.mktemp("elsewhere") / "abs.png"
    other.write_bytes(_png(250))
    return root, other


def _write(path: Path, rows: list[list[str]], delimiter=",") -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f, delimiter=delimiter).writerows(rows)
    return path


def test_csv_relative_zip_and_absolute_paths_with_splits(tree):
    root, other = tree
    rows = [["path", "label", "split"]]
    rows += [[f"photos/{i}.png", "cat" if i % 2 else "dog", "train"] for i in range(8)]
    rows += [[f"photos/{i}.png", "cat" if i % 2 else "dog", "validation"] for i in range(8, 12)]
    rows += [[f"more.zip::m/{i}.png", "cat" if i % 2 else "dog", "test"] for i in range(4)]
    rows += [[str(other), "dog", "train"]]
    src = csv_manifest(str(_write(root / "m.csv", rows)))
    assert src.classes == ["cat", "dog"]
    assert (len(src.train), len(src.val), len(src.test)) == (9, 4, 4)
    assert src.train.files[0] == str(root / "photos" / "0.png") and src.train.files[-1] == str(other)
    assert src.test.files[0] == f"{root / 'more.zip'}::m/0.png"
    assert src.train.labels.tolist() == [1, 0, 1, 0, 1, 0, 1, 0, 1]
    # prepare decodes every split (a zip member included) at the asked size; each image keeps its pixel value
    cfg = C.load(None, ["data.name=csv", f"data.root={root / 'm.csv'}", "data.image_size=8"])
    sp = prepare(cfg.data)
    assert sp.eval_split == "test" and tuple(sp.test.images.shape) == (4, 3, 8, 8)
    assert sp.test.images[:, 0, 0, 0].tolist() == [200, 201, 202, 203]


def test_tsv_without_header_numeric_classes_sorted_as_numbers(tree):
    root, _ = tree
    rows = [[f"photos/{i}.png", str([2, 10][i % 2])] for i in range(6)]
    src = csv_manifest(str(_write(root / "m.tsv", rows, delimiter="\t")))
    assert src.classes == ["2", "10"] and src.train.labels.tolist() == [0, 1, 0, 1, 0, 1]


@pytest.mark.parametrize("bad_row, says", [
    (["photos/nope.png", "cat"], "line 4: image 'photos/nope.png' not found"),
    (["more.zip::m/nope.png", "cat"], "line 4: image 'more.zip::m/nope.png' not found"),
    (["photos/1.png", ""], "line 4: 'photos/1.png' has an empty label"),
    (["photos/1.png", "cat", "holdout"], "line 4: split 'holdout' is not one of train, val, test"),
])
def test_bad_rows_are_named_by_line(tree, bad_row, says):
    root, _ = tree
    rows = [["path", "label", "split"], ["photos/0.png", "dog", "train"], ["photos/2.png", "cat", "train"],
            bad_row + ["train"] * (3 - len(bad_row))]
    with pytest.raises(ManifestError, match=says.replace("(", r"\(").replace(".", r"\.")):
        csv_manifest(str(_write(root / "bad.csv", rows)))


def test_coco_subset_manifest_loads_as_written(tree):
    """The builder's manifest.csv (coco_image_id, class, source_file, file) beside its class folders."""
    root, _ = tree
    rows = [["coco_image_id", "class", "source_file", "file"]]
    rows += [[str(100 + i), "bus" if i % 2 else "cat", f"/coco/{i}.jpg", f"photos/{i}.png"] for i in range(6)]
    src = csv_manifest(str(_write(root / "manifest.csv", rows)))
    assert src.classes == ["bus", "cat"] and src.train.files[2] == str(root / "photos" / "2.png")


def _cli(capsys, *argv) -> tuple[int, str, str]:
    """`cnnlab ...` in this process (cli.main maps errors to exit codes as the command does)."""
    from cnnlab import cli

    capsys.readouterr()
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_stats_and_check_on_a_manifest(tree, capsys):
    root, _ = tree
    rows = [["path", "label"]] + [[f"photos/{i}.png", "ab"[i % 2]] for i in range(12)]
    m = _write(root / "cli.csv", rows)
    code, out, err = _cli(capsys, "data", "stats", str(m), "--size", "8", "--json", "--jobs", "1")
    assert code == 0 and json.loads(out)["n_images"] == 12, err
    code, out, err = _cli(capsys, "data", "check", str(m), "--jobs", "1")
    assert code == 0 and "12 images checked" in out, out + err
    bad = _write(root / "cli-bad.csv", rows + [["photos/gone.png", "a"]])
    code, out, err = _cli(capsys, "data", "check", str(bad))
    assert code == 2 and "line 14" in err and "photos/gone.png" in err, err


def _hf_saved(path: Path, *, as_dict: bool) -> Path:
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["ant", "bee", "cow"])})

    def make(values):
        return datasets.Dataset.from_dict({"img": [{"bytes": _png(v, (8, 8)), "path": None} for v in values],
                                           "label": [v % 3 for v in values]}, features=feats)

    if as_dict:
        datasets.DatasetDict({"train": make(range(30)), "validation": make(range(30, 39))}).save_to_disk(str(path))
    else:
        make(range(30)).save_to_disk(str(path))
    return path


def test_hf_saved_dataset_dict_trains_split_by_split(tmp_path):
    root = _hf_saved(tmp_path / "hfset", as_dict=True)
    src = open_source("hf", root=str(root))
    assert src.classes == ["ant", "bee", "cow"] and (len(src.train), len(src.val)) == (30, 9)
    assert isinstance(src.train.labels, np.ndarray) and src.val.labels.tolist() == [v % 3 for v in range(30, 39)]
    sp = prepare(C.load(None, ["data.name=hf", f"data.root={root}"]).data)
    assert sp.train.images[:, 0, 0, 0].tolist() == list(range(30))  # every row's own image, decoded by index
    assert sp.val.images[:, 0, 0, 0].tolist() == list(range(30, 39))


def test_hf_single_dataset_text_labels_and_cli(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"picture": [{"bytes": _png(v, (8, 8)), "path": None} for v in range(12)],
                                     "kind": ["x", "y", "z"] * 4},
                                    features=datasets.Features({"picture": datasets.Image(),
                                                                "kind": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "t"))
    src = open_source("hf", root=str(tmp_path / "t"), options={"label_column": "kind"})
    assert src.classes == ["x", "y", "z"] and src.train.labels.tolist() == [0, 1, 2] * 4
    with pytest.raises(ValueError, match="no label column"):
        open_source("hf", root=str(tmp_path / "t"))
    root = _hf_saved(tmp_path / "one", as_dict=False)
    code, out, err = _cli(capsys, "data", "check", str(root), "--jobs", "1")
    assert code == 0 and "30 images checked" in out, out + err


def test_own_photos_example_trains_on_photos_of_varied_sizes(tmp_path):
    """examples/own-photos.yaml on 18 photos of different sizes and shapes listed in a manifest, an imbalanced
    class included. Tests download nothing and keep to seconds: the ImageNet ResNet-18 gives way to a tiny
    net (model.* overridden); everything the example sets about data, augmentation and the loss is as written."""
    import cnnlab
    from cnnlab import rundir as R

    rng = np.random.default_rng(0)
    rows = ["path,label"]
    for i in range(18):
        w, h = int(rng.integers(20, 60)), int(rng.integers(20, 60))
        label = "rare" if i % 6 == 0 else "ab"[i % 2]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"p{i}.jpg")
        rows.append(f"p{i}.jpg,{label}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    tiny = "[{conv: {out: 4, k: 3, padding: 1}}, relu, {maxpool: 4}, flatten, {linear: classes}]"
    run = cnnlab.train("examples/own-photos.yaml", [f"data.root={tmp_path / 'manifest.csv'}", "model.pretrained=null",
                                                    "model.name=layers", f"model.layers={tiny}",
                                                    "data.image_size=24", "data.eval_resize_size=28", "data.val_split=6",
                                                    "train.epochs=1", "train.batch_size=6", "train.progress=off",
                                                    f"output.dir={tmp_path / 'runs'}", "output.report=false"])
    data = R.read_json(run.dir / R.DATA)
    assert data["classes"] == ["a", "b", "rare"] and data["input_size"] == 24
    assert len(R.read_csv(run.dir / R.HISTORY)) == 1
