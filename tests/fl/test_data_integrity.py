"""Damaged, truncated and oversized archives are one-line DataErrors, never silent data."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from fedquant.errors import DataError
from fedquant.fl.data import archive, load_cifar10_batches, load_idx, load_image_folder


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _images(n_train: int, n_test: int, seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    files = {}
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            cls = ("ant", "bee")[i % 2]
            files[f"{split}/{cls}/{i:04d}.png"] = _png(rng.integers(0, 256, (4, 4), np.uint8))
    return files


def _tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for rel in sorted(files):
            info = tarfile.TarInfo(rel)
            info.size = len(files[rel])
            tf.addfile(info, io.BytesIO(files[rel]))
    return buf.getvalue()


def _header_offsets(raw: bytes) -> list[int]:
    """Byte offset of each member's header in an uncompressed tar."""
    out, off = [], 0
    while off + 512 <= len(raw) and raw[off : off + 512].count(0) != 512:
        out.append(off)
        size = int(raw[off + 124 : off + 136].rstrip(b"\0 ") or b"0", 8)
        off += 512 + (size + 511) // 512 * 512
    return out


def test_intact_tar_and_tar_gz_load_every_image(tmp_path: Path) -> None:
    raw = _tar_bytes(_images(50, 10))
    (tmp_path / "d.tar").write_bytes(raw)
    (tmp_path / "d.tar.gz").write_bytes(gzip.compress(raw))
    for name in ("d.tar", "d.tar.gz"):
        ds = load_image_folder(tmp_path / name)
        assert (len(ds.train_y), len(ds.test_y)) == (50, 10)


def test_damaged_header_near_the_end_is_an_error_not_57_of_60(tmp_path: Path) -> None:
    raw = bytearray(_tar_bytes(_images(50, 10)))
    offsets = _header_offsets(bytes(raw))
    assert len(offsets) == 60
    raw[offsets[57] + 10] ^= 0x41  # one flipped byte in the name field: bad header checksum
    (tmp_path / "d.tar").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"d\.tar: corrupt tar archive: damaged member header"):
        load_image_folder(tmp_path / "d.tar")


def test_tar_without_its_end_marker_is_truncated(tmp_path: Path) -> None:
    raw = _tar_bytes(_images(6, 2))
    offsets = _header_offsets(raw)
    (tmp_path / "d.tar").write_bytes(raw[: offsets[-1]])  # cut on a member boundary
    with pytest.raises(DataError, match=r"ends without its end-of-archive marker"):
        load_image_folder(tmp_path / "d.tar")


def test_data_after_the_end_marker_is_an_error(tmp_path: Path) -> None:
    raw = bytearray(_tar_bytes(_images(6, 2)))
    offsets = _header_offsets(bytes(raw))
    end = offsets[-1] + 1024  # the last member is a header and one block of data
    raw[end + 700] = 7  # in the second zero block of the end marker
    (tmp_path / "d.tar").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"data after the end-of-archive marker"):
        load_image_folder(tmp_path / "d.tar")


def test_gzip_crc_mismatch_is_an_error(tmp_path: Path) -> None:
    # the deflate data is intact, only the CRC-32 of the trailer is wrong: only a
    # reader that reads the stream to its end and checks the CRC can notice
    gz = bytearray(gzip.compress(_tar_bytes(_images(6, 2))))
    gz[-8] ^= 0xFF
    (tmp_path / "d.tar.gz").write_bytes(bytes(gz))
    with pytest.raises(DataError, match=r"d\.tar\.gz: corrupt or truncated gzip data: CRC check"):
        load_image_folder(tmp_path / "d.tar.gz")


def test_flipped_bytes_in_the_compressed_stream_never_load(tmp_path: Path) -> None:
    gz = gzip.compress(_tar_bytes(_images(20, 6)))
    rng = np.random.default_rng(1)
    # positions inside the deflate data (after the 10-byte header, before the 8-byte trailer)
    for pos in rng.integers(20, len(gz) - 40, size=12):
        bad = bytearray(gz)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        (tmp_path / "d.tar.gz").write_bytes(bytes(bad))
        with pytest.raises(DataError, match=r"d\.tar\.gz: "):
            load_image_folder(tmp_path / "d.tar.gz")


def _write_cifar(root: Path, meta: dict[bytes, object]) -> None:
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for n in names:
        d = {b"data": rng.integers(0, 256, (2, 3072), np.uint8), b"labels": [0, 1]}
        (root / n).write_bytes(pickle.dumps(d, protocol=2))
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


def test_cifar_tarball_with_bad_crc_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    _write_cifar(src, {b"label_names": [b"a", b"b"]})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(src, arcname="cifar-10-batches-py")
    (tmp_path / "c.tar.gz").write_bytes(buf.getvalue())
    assert load_cifar10_batches(tmp_path / "c.tar.gz").classes == ("a", "b")
    gz = bytearray(buf.getvalue())
    gz[-6] ^= 0x10
    (tmp_path / "c.tar.gz").write_bytes(bytes(gz))
    with pytest.raises(DataError, match=r"c\.tar\.gz: corrupt or truncated gzip data: CRC check"):
        load_cifar10_batches(tmp_path / "c.tar.gz")


def test_cifar_label_names_not_utf8(tmp_path: Path) -> None:
    _write_cifar(tmp_path, {b"label_names": [b"\xff\xfe", b"b"]})
    with pytest.raises(DataError, match=r"batches\.meta: 'label_names' are not UTF-8 text"):
        load_cifar10_batches(tmp_path)


def _idx_images(dims: tuple[int, int, int], body: bytes) -> bytes:
    return struct.pack(">IIII", 0x803, *dims) + body


def _write_mnist(root: Path, images: bytes) -> None:
    labels = struct.pack(">II", 0x801, 2) + b"\x00\x01"
    ok = _idx_images((2, 4, 4), bytes(32))
    (root / "train-images-idx3-ubyte").write_bytes(images)
    (root / "train-labels-idx1-ubyte").write_bytes(labels)
    (root / "t10k-images-idx3-ubyte").write_bytes(ok)
    (root / "t10k-labels-idx1-ubyte").write_bytes(labels)


def test_idx_dims_that_overflow_int64_are_an_error(tmp_path: Path) -> None:
    # 0xFFFFFFFF**3 overflows int64: the product must be exact, not wrapped around
    _write_mnist(tmp_path, _idx_images((0xFFFFFFFF,) * 3, bytes(32)))
    with pytest.raises(DataError, match=r"truncated: the header announces dimensions"):
        load_idx(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").unlink()
    gz = gzip.compress(_idx_images((0xFFFFFFFF,) * 3, bytes(32)))
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gz)
    with pytest.raises(DataError, match=r"truncated: the header announces dimensions"):
        load_idx(tmp_path)


def _zeros_gzip(n: int) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip container
    chunk = bytes(1 << 20)
    out = [c.compress(chunk) for _ in range(n >> 20)]
    out.append(c.flush())
    return b"".join(out)


def test_decompression_bomb_is_refused_early(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 64 MiB of zeros in ~64 KB of gzip (ratio ~1000); the limits are lowered so the
    # test stays small: the file may expand to 16 x its size + 1 MiB (~2 MiB)
    monkeypatch.setattr(archive, "EXPANSION_ALLOWANCE", 1 << 20)
    bomb = _zeros_gzip(64 << 20)
    limit = archive.expansion_limit(len(bomb))
    assert limit < 3 << 20
    path = tmp_path / "bomb.tar.gz"
    path.write_bytes(bomb)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"bomb\.tar\.gz: decompresses to more than .* bomb"):
            load_image_folder(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # refused while reading: never near the 64 MiB the stream would expand to
    assert peak < 4 * limit, peak
    # an IDX file whose header announces a large image set of zeros: refused the same way
    _write_mnist(tmp_path, b"")
    (tmp_path / "train-images-idx3-ubyte").unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(_idx_images((4096, 64, 64), bytes(4096 * 64 * 64)), 9)
    )
    with pytest.raises(DataError, match=r"decompresses to more than"):
        load_idx(tmp_path)


def test_within_the_bound_a_compressible_file_loads(tmp_path: Path) -> None:
    # an all-zero IDX image set expands ~1000x but stays under the fixed allowance
    _write_mnist(tmp_path, b"")
    (tmp_path / "train-images-idx3-ubyte").unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(_idx_images((2, 4, 4), bytes(32)))
    )
    assert load_idx(tmp_path).train_x.shape == (2, 4, 4, 1)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` grey pixels (IHDR, empty IDAT, IEND)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def test_huge_png_is_a_data_error(tmp_path: Path) -> None:
    files = _images(2, 2)
    files["train/ant/0000.png"] = _png_header_only(20000, 20000)
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    with pytest.raises(DataError, match=r"0000\.png: image too large to decode safely"):
        load_image_folder(tmp_path)
