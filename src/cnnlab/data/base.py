"""The two shapes a data set split can take: decoded uint8 images in memory, or files decoded on demand."""
from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cnnlab.errors import InputError

ZIP_SEP = "::"  # "archive.zip::train/cat/0001.jpg" names a member of a zip


def cache_dir() -> Path:
    """Where cnnlab keeps what it downloads and decodes: $CNNLAB_CACHE, else ~/.cache/cnnlab. Read at
    each call, so setting the variable takes effect at any time."""
    return Path(os.environ.get("CNNLAB_CACHE") or "~/.cache/cnnlab").expanduser()


class DataFileError(InputError, ValueError):
    """A data file (or zip member) that cannot be read or decoded; the message starts with its name."""


def split_ref(ref: str) -> tuple[str, str] | None:
    """'archive.zip::member' -> ('archive.zip', 'member'); None for a plain path. Only a '::' right after
    '.zip' separates, so a file named 'shot::1.png' (legal on Linux and macOS) is a plain path."""
    i = ref.lower().find(".zip" + ZIP_SEP)
    return None if i < 0 else (ref[:i + 4], ref[i + 4 + len(ZIP_SEP):])


@dataclass
class ImageSet:
    """One split. Exactly one of `images` (N, C, H, W) uint8 or `files` (N paths) is set.

    `ids` name each sample for the report (a file path, or "<split>/<index>").
    """

    labels: np.ndarray  # (N,) int64
    classes: list[str]
    images: torch.Tensor | None = None  # (N, C, H, W) uint8
    files: list[str] | None = None
    ids: list[str] = field(default_factory=list)
    # how `files` are brought to the square size when decoded: (data.resize mode, shorter side for "crop")
    resize: tuple[str, int | None] = ("squash", None)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if (self.images is None) == (self.files is None):
            raise ValueError("ImageSet needs exactly one of images or files")
        if self.images is not None:
            assert self.images.dtype == torch.uint8 and self.images.ndim == 4, "images must be (N, C, H, W) uint8"
            assert len(self.images) == len(self.labels)
        else:
            assert len(self.files) == len(self.labels)
        if not self.ids:
            self.ids = list(self.files) if self.files is not None else [str(i) for i in range(len(self.labels))]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def subset(self, idx: np.ndarray) -> "ImageSet":
        idx = np.asarray(idx, dtype=np.int64)
        return ImageSet(
            labels=self.labels[idx],
            classes=self.classes,
            images=self.images[torch.from_numpy(idx)] if self.images is not None else None,
            files=[self.files[i] for i in idx] if self.files is not None else None,
            ids=[self.ids[i] for i in idx],
            resize=self.resize,
        )


@dataclass
class DataSource:
    """What a registered data set function returns: its splits as the files define them."""

    train: ImageSet
    classes: list[str]
    val: ImageSet | None = None
    test: ImageSet | None = None
    description: str = ""


def _open_zip(path: str) -> zipfile.ZipFile:
    """The archive at `path`, opened once per version of the file: cached by path and the file's identity
    (inode, size, modification time), so a zip replaced at the same path is read anew, never through the
    handle of the file it replaced (a long-lived process: the Python API, a notebook, a study)."""
    try:
        st = os.stat(path)
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        stamp = None  # zipfile raises the error naming the path
    return _open_zip_version(path, stamp)


@lru_cache(maxsize=16)
def _open_zip_version(path: str, stamp) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as e:  # not a zip, empty, truncated
        raise DataFileError(f"{path}: not a readable zip archive ({e}); is it complete? "
                            "(`unzip -t` tests it)") from None


_open_zip.cache_clear = _open_zip_version.cache_clear  # type: ignore[attr-defined]


MAX_MEMBER_BYTES = 1 << 30  # no image file needs more (Pillow's pixel limit is ~270 MB of RGB)
MAX_RATIO, RATIO_FROM = 100, 16 << 20  # images hardly compress: a big member shrunk over 100x is a zip bomb


class ZipBombError(InputError, OSError):
    """A zip member whose declared size or compression ratio no image has; refused before it is read."""


def check_member(info: zipfile.ZipInfo, archive: str) -> None:
    """Refuse a member before decompressing it (zipfile never returns more than the declared size)."""
    size, packed = info.file_size, max(1, info.compress_size)
    if size > MAX_MEMBER_BYTES or (size > RATIO_FROM and size / packed > MAX_RATIO):
        raise ZipBombError(f"{archive}{ZIP_SEP}{info.filename}: refusing to read this zip member: it unpacks "
                           f"{packed:,} bytes into {size:,} ({size / packed:,.0f}x); no image needs that "
                           f"(limits: {MAX_MEMBER_BYTES:,} bytes, {MAX_RATIO}x above {RATIO_FROM:,}). "
                           "A zip bomb? Remove the member from the archive.")


def read_bytes(ref: str) -> bytes:
    """The bytes of a file or zip member. A member whose size no image has is refused before it is read
    (ZipBombError); a damaged one (bad CRC, encrypted, unknown compression) raises DataFileError naming it;
    a missing member KeyError, a missing file OSError."""
    if ref.startswith("hf:"):  # a row of a Hugging Face data set (data/hf.py), in any process
        from cnnlab.data import hf

        return hf.read_bytes(ref)
    parts = split_ref(ref)
    if parts is None:
        return Path(ref).read_bytes()
    archive, member = parts
    zf = _open_zip(archive)
    info = zf.getinfo(member)
    check_member(info, archive)
    try:
        return zf.read(info)
    except Exception as e:  # BadZipFile (CRC), RuntimeError (encrypted), NotImplementedError, zlib.error, EOFError
        raise DataFileError(f"{ref}: cannot read this zip member ({type(e).__name__}: {e})") from None


class NamedBytes(io.BytesIO):
    """In-memory file bytes that Pillow's errors name by the file, not as `<_io.BytesIO object at 0x...>`."""

    def __init__(self, data: bytes, ref: str):
        super().__init__(data)
        self.ref = ref

    def __repr__(self) -> str:
        return repr(self.ref)


def open_image(ref: str) -> Image.Image:
    """Open an image file (or zip member) and load it; DataFileError naming the file on unreadable,
    truncated or oversized (decompression bomb) data."""
    data = read_bytes(ref)
    try:
        img = Image.open(NamedBytes(data, ref))
        img.load()
    except Image.DecompressionBombError as e:
        raise DataFileError(f"{ref}: {e}; not decoded (`cnnlab data check` lists every such file)") from e
    except Exception as e:  # UnidentifiedImageError, OSError (truncated), SyntaxError, struct.error, ...
        raise DataFileError(f"{ref}: not an image Pillow can read ({len(data)} bytes; {type(e).__name__}: {e}); "
                            "`cnnlab data check` lists every unreadable file") from e
    return img


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any Pillow mode (L, LA, P, RGBA, CMYK, I;16, ...) to 'L' or 'RGB'."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1 else 1.0), 0, 255).astype(np.uint8), "L")
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):  # composite on white rather than dropping alpha to black
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img.convert("RGBA"))
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def eval_resize(data) -> tuple[str, int | None]:
    """How evaluation images (val, test, predict) reach the square size, from a DataConfig: the pretrained
    weights' shorter-side-then-center-crop when data.eval_resize_size is set, else data.resize."""
    return ("crop", data.eval_resize_size) if getattr(data, "eval_resize_size", None) else \
        (getattr(data, "resize", "squash"), None)


def decode(ref: str, channels: int, size: int | None, resize: str = "squash",
           resize_size: int | None = None) -> torch.Tensor:
    """A file as a (C, H, W) uint8 tensor, converted to `channels` and brought to `size` x `size` (`fit`)."""
    img = open_image(ref)
    try:
        return decode_image(img, channels, size, resize, resize_size)
    except Exception as e:  # a mode Pillow cannot convert, a failed resize
        raise DataFileError(f"{ref}: cannot convert this {img.mode} {img.size[0]}x{img.size[1]} image "
                            f"({type(e).__name__}: {e})") from None


def fit(img: Image.Image, size: int, resize: str = "squash", resize_size: int | None = None) -> Image.Image:
    """An image brought to `size` x `size` (data.resize): squash = resized whole (bilinear); crop = the
    shorter side resized to `resize_size` (default `size`), then the center `size` x `size` (torchvision's
    Resize + CenterCrop, the pretrained weights' eval recipe); pad = padded with black to a centred square,
    then resized. Images already `size` x `size` are kept as they are."""
    if img.size == (size, size) and resize_size in (None, size):
        return img
    if resize == "squash":
        return img.resize((size, size), Image.BILINEAR)
    from torchvision.transforms.v2 import functional as F

    if resize == "crop":
        return F.center_crop(F.resize(img, resize_size or size, antialias=True), [size, size])
    if resize == "pad":
        w, h = img.size
        side = max(w, h)
        left, top = (side - w) // 2, (side - h) // 2
        img = F.pad(img, [left, top, side - w - left, side - h - top], fill=0)
        return img if side == size else img.resize((size, size), Image.BILINEAR)
    raise ValueError(f"data.resize={resize!r} is not one of squash, crop, pad")


def decode_image(img: Image.Image, channels: int, size: int | None, resize: str = "squash",
                 resize_size: int | None = None) -> torch.Tensor:
    """An opened Pillow image as `decode` returns a file: (C, H, W) uint8, `channels`, `size` x `size`."""
    img = to_mode(img, channels)
    if size is not None:
        img = fit(img, size, resize, resize_size)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
