"""Downloads are verified before use, archives cannot write outside their target, pickles cannot run code."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tarfile
import zipfile

import numpy as np
import pytest

from cnnlab.data import download as dl


def _md5(path) -> str:
    return hashlib.md5(open(path, "rb").read()).hexdigest()


@pytest.fixture
def fake_net(monkeypatch):
    """Replace the one network call with a copy from a local 'server' dict url -> file."""
    server: dict[str, str] = {}

    def fetch(url, dest):
        if url not in server:
            raise OSError(f"unreachable in tests: {url}")
        shutil.copyfile(server[url], dest)

    monkeypatch.setattr(dl, "_fetch", fetch)
    return server


# ----------------------------------------------------------------------------------------------
# Checksums


def test_download_verifies_and_keeps_good_file(tmp_path, fake_net):
    src = tmp_path / "good.bin"
    src.write_bytes(b"official bytes" * 100)
    fake_net["https://example.org/data/good.bin"] = str(src)
    (tmp_path / "dl").mkdir()
    out = dl.download("https://example.org/data/good.bin", tmp_path / "dl", md5=_md5(src))
    assert out == tmp_path / "dl" / "good.bin" and out.read_bytes() == src.read_bytes()
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    out2 = dl.download("https://example.org/data/good.bin", tmp_path / "dl2.bin", sha256=sha)
    assert out2.read_bytes() == src.read_bytes()
    del fake_net["https://example.org/data/good.bin"]  # a verified copy is kept, not fetched again
    assert dl.download("https://example.org/data/good.bin", tmp_path / "dl", md5=_md5(src)) == out


def test_one_byte_change_is_refused_before_extraction(tmp_path, fake_net):
    payload = tmp_path / "payload"
    payload.mkdir()
    (payload / "a.txt").write_text("hello")
    good = tmp_path / "good.tar.gz"
    with tarfile.open(good, "w:gz") as tf:
        tf.add(payload / "a.txt", arcname="pkg/a.txt")
    md5 = _md5(good)
    bad = tmp_path / "bad.tar.gz"
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0x01  # one byte
    bad.write_bytes(bytes(data))
    fake_net["https://example.org/pkg.tar.gz"] = str(bad)
    dest = tmp_path / "cache"
    with pytest.raises(dl.ChecksumError) as e:
        dl.download("https://example.org/pkg.tar.gz", dest / "pkg.tar.gz", md5=md5)
    msg = str(e.value)
    assert "pkg.tar.gz" in msg and md5 in msg and _md5(bad) in msg
    assert not (dest / "pkg.tar.gz").exists() and not list(dest.glob("*.part"))  # nothing kept, nothing extracted
    assert not (dest / "pkg").exists()


def test_mirror_fallback_and_no_checksum_refused(tmp_path, fake_net):
    src = tmp_path / "f.bin"
    src.write_bytes(b"x")
    fake_net["https://mirror2/f.bin"] = str(src)
    out = dl.download(["https://mirror1/f.bin", "https://mirror2/f.bin"], tmp_path / "f2.bin", md5=_md5(src))
    assert out.read_bytes() == b"x"
    with pytest.raises(ValueError, match="sha256= or md5="):
        dl.download("https://mirror2/f.bin", tmp_path / "f3.bin")


def test_stale_local_copy_is_fetched_again(tmp_path, fake_net):
    src = tmp_path / "f.bin"
    src.write_bytes(b"right")
    fake_net["https://h/f.bin"] = str(src)
    dest = tmp_path / "d" / "f.bin"
    dest.parent.mkdir()
    dest.write_bytes(b"partial")
    assert dl.download("https://h/f.bin", dest, md5=_md5(src)).read_bytes() == b"right"


# ----------------------------------------------------------------------------------------------
# Archives


def _evil_tars(tmp_path):
    """name -> tar path, each with one member that escapes the target."""
    out = {}

    def tar(name, build):
        p = tmp_path / f"{name}.tar.gz"
        with tarfile.open(p, "w:gz") as tf:
            ok = tarfile.TarInfo("fine.txt")
            ok.size = 2
            tf.addfile(ok, io.BytesIO(b"ok"))
            build(tf)
        out[name] = p

    def member(name, data=b"evil", **kw):
        def build(tf):
            ti = tarfile.TarInfo(name)
            for k, v in kw.items():
                setattr(ti, k, v)
            if ti.type == tarfile.REGTYPE:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            else:
                tf.addfile(ti)
        return build

    tar("dotdot", member("../escaped.txt"))
    tar("nested_dotdot", member("a/../../escaped.txt"))
    tar("absolute", member(str(tmp_path / "abs_escaped.txt")))
    tar("symlink_out", member("link", type=tarfile.SYMTYPE, linkname="../../outside"))
    tar("symlink_abs", member("link", type=tarfile.SYMTYPE, linkname="/etc/passwd"))
    tar("hardlink_out", member("hl", type=tarfile.LNKTYPE, linkname="../outside.txt"))
    return out


def _evil_zips(tmp_path):
    out = {}
    for name, member in [("dotdot", "../escaped.txt"), ("absolute", "/abs_escaped.txt"),
                         ("nested_dotdot", "a/../../escaped.txt")]:
        p = tmp_path / f"{name}.zip"
        with zipfile.ZipFile(p, "w") as zf:
            zf.writestr("fine.txt", "ok")
            zf.writestr(zipfile.ZipInfo(member), "evil")
        out[name] = p
    p = tmp_path / "symlink_out.zip"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("fine.txt", "ok")
        info = zipfile.ZipInfo("link")
        info.external_attr = (0o120777 << 16)  # a symlink, as `zip --symlinks` stores it
        zf.writestr(info, "../../outside")
    out["symlink_out"] = p
    return out


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_safe_extract_refuses_escapes(tmp_path, kind):
    evil_dir = tmp_path / "archives"
    evil_dir.mkdir()
    archives = _evil_tars(evil_dir) if kind == "tar" else _evil_zips(evil_dir)
    before = {p for p in tmp_path.rglob("*")}
    for name, archive in archives.items():
        target = tmp_path / "sandbox" / "t" / name
        with pytest.raises(dl.UnsafeArchiveError, match="refusing to extract"):
            dl.safe_extract(archive, target)
        assert not (target / "fine.txt").exists(), f"{name}: members were written before the check"
    after = {p for p in tmp_path.rglob("*")}
    landed = {p for p in after - before if "sandbox" not in p.parts}
    assert not landed, f"files landed outside the target: {landed}"
    assert not (tmp_path / "abs_escaped.txt").exists()


def test_safe_extract_accepts_normal_archives(tmp_path):
    t = tmp_path / "ok.tar.gz"
    with tarfile.open(t, "w:gz") as tf:
        for name, data in [("d/a.txt", b"a"), ("d/sub/b.txt", b"b")]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        link = tarfile.TarInfo("d/sub/link")
        link.type, link.linkname = tarfile.SYMTYPE, "../a.txt"  # inside the target: fine
        tf.addfile(link)
    out = dl.safe_extract(t, tmp_path / "x")
    assert (out / "d/sub/b.txt").read_bytes() == b"b" and (out / "d/sub/link").read_bytes() == b"a"
    z = tmp_path / "ok.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("d/a.txt", "a")
    assert (dl.safe_extract(z, tmp_path / "y") / "d/a.txt").read_text() == "a"


# ----------------------------------------------------------------------------------------------
# Pickles


class _Payload:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _EvalPayload:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (eval, (self.code,))


def test_restricted_load_reads_numpy_and_plain_values(tmp_path):
    obj = {"data": np.arange(12, dtype=np.uint8).reshape(3, 4), "labels": [1, 2, 3], "name": b"batch 1",
           "f": 1.5, "t": (1, "a"), "s": {1, 2}}
    for proto in (2, 4, 5):
        back = dl.restricted_loads(pickle.dumps(obj, protocol=proto))
        assert np.array_equal(back["data"], obj["data"]) and back["labels"] == [1, 2, 3]
        assert back["name"] == b"batch 1" and back["t"] == (1, "a") and back["s"] == {1, 2}


@pytest.mark.parametrize("make", [
    lambda s: _Payload(f"touch {s}"),
    lambda s: _EvalPayload(f"open({str(s)!r}, 'w').write('pwned')"),
    lambda s: {"data": np.zeros(3, np.uint8), "labels": [_Payload(f"touch {s}")]},  # hidden inside a batch
])
def test_restricted_load_refuses_code_execution(tmp_path, make):
    sentinel = tmp_path / "sentinel"
    blob = tmp_path / "data_batch_1"
    blob.write_bytes(pickle.dumps(make(sentinel), protocol=2))
    with pytest.raises(dl.UnsafePickleError, match="refusing to load global") as e:
        dl.restricted_load(blob)
    assert "data_batch_1" in str(e.value)
    assert not sentinel.exists(), "the payload ran"
