"""Image trees ``{train,test}/{class}/*.jpg|*.png`` in a folder or a tarball (JPEG/PNG decoding)."""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath

import numpy as np

from fedquant.errors import DataError
from fedquant.fl.data.archive import open_tar
from fedquant.fl.data.dataset import Dataset, StrPath

_SPLITS = ("train", "test")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_MODES = {"L": 1, "RGB": 3}


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(_IMAGE_SUFFIXES)


def _is_tar(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith((".tar", ".tar.gz", ".tgz"))


def _decode_image(data: bytes, source: str) -> tuple[bytes, tuple[int, int, int]]:
    """Decode one image file; return its pixels (row-major HWC bytes) and ``(H, W, C)``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode, (w, h) = img.mode, img.size
            if mode not in _MODES:
                raise DataError(
                    f"{source}: unsupported image mode {mode!r}; expected one of "
                    f"{', '.join(_MODES)} (convert the images to grey or RGB)"
                )
            return img.tobytes(), (h, w, _MODES[mode])
    except Image.DecompressionBombError as e:
        raise DataError(
            f"{source}: image too large to decode safely ({e}); expected images of at most "
            f"{Image.MAX_IMAGE_PIXELS:,} pixels"
        ) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{source}: cannot decode image: {e}") from e


def _split_root(path: Path) -> Path:
    """The folder holding ``train/`` and ``test/``: ``path`` itself or its only such child."""
    if all((path / s).is_dir() for s in _SPLITS):
        return path
    subs = [
        p for p in sorted(path.iterdir()) if p.is_dir() and all((p / s).is_dir() for s in _SPLITS)
    ]
    if len(subs) == 1:
        return subs[0]
    raise DataError(
        f"{path}: expected the folders train/ and test/ (each with one folder of images per "
        f"class), directly or inside one top folder"
    )


def _folder_files(root: Path) -> list[tuple[str, str, Path]]:
    """(split, class, file) for every image under ``root/{train,test}/{class}/``."""
    out = []
    for split in _SPLITS:
        for cls in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            out += [
                (split, cls.name, f)
                for f in sorted(cls.iterdir())
                if _is_image_name(f.name) and f.is_file()
            ]
    return out


def _tar_entries(path: Path) -> Iterator[tuple[str, str, str, bytes]]:
    """Stream (split, class, member name, bytes) from a tarball, detecting a top folder."""
    prefix: str | None = None
    seen_layout = False
    with open_tar(path) as members:
        for m, f in members:
            parts = PurePosixPath(m.name).parts
            if f is None or not parts or not _is_image_name(parts[-1]):
                continue
            if any(p.startswith(".") or p == "__MACOSX" for p in parts):
                continue
            if len(parts) == 3 and parts[0] in _SPLITS:
                top, rest = None, parts
            elif len(parts) == 4 and parts[1] in _SPLITS:
                top, rest = parts[0], parts[1:]
            else:
                raise DataError(
                    f"{path}: member {m.name!r} does not fit the layout "
                    f"[top/]{{train,test}}/<class>/<image>"
                )
            if seen_layout and top != prefix:
                raise DataError(
                    f"{path}: member {m.name!r} is under top folder {top!r}, others under "
                    f"{prefix!r}; expected one tree"
                )
            prefix, seen_layout = top, True
            yield rest[0], rest[1], m.name, f.read()


class _SplitBuffer:
    """Pixels of one split appended image by image, with each image's sort key."""

    def __init__(self) -> None:
        self.pixels = bytearray()
        self.keys: list[tuple[str, str]] = []

    def arrays(
        self, shape: tuple[int, int, int], labels: Mapping[str, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        order = sorted(range(len(self.keys)), key=self.keys.__getitem__)
        x = np.frombuffer(self.pixels, dtype=np.uint8).reshape(len(self.keys), *shape)[order]
        y = np.array([labels[self.keys[i][0]] for i in order], dtype=np.int64)
        return x, y


def load_image_folder(path: StrPath, *, name: str = "imagefolder") -> Dataset:
    """Load an image tree ``{train,test}/{class}/*.jpg|*.jpeg|*.png`` from a folder or a tarball.

    The tree may sit directly in ``path`` or inside one top folder (e.g.
    ``cifar10-jpeg/train/airplane/0000.jpg``); a ``.tar``, ``.tar.gz`` or
    ``.tgz`` is read as a stream, never extracted. Class names are the
    sub-folder names of ``train/``, sorted, so label ``k`` is the ``k``-th
    name in alphabetical order. Within a split, images are ordered by
    (class, file name), independent of the order in the archive.

    All images must have the same size and mode (``L`` -> 1 channel, ``RGB`` ->
    3). Hidden files (``.*``) and non-image files are ignored.

    Parameters
    ----------
    path : str or os.PathLike
        The folder or tarball.
    name : str, default "imagefolder"
        Name given to the returned data set.

    Returns
    -------
    Dataset

    Raises
    ------
    DataError
        If the layout is wrong, an image cannot be decoded, sizes or modes
        differ, a split is empty or the test split has a class train lacks.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such folder or tarball")
    if path.is_dir():
        entries: Iterator[tuple[str, str, str, bytes]] = (
            (split, cls, str(f), f.read_bytes())
            for split, cls, f in _folder_files(_split_root(path))
        )
    elif _is_tar(path):
        entries = _tar_entries(path)
    else:
        raise DataError(f"{path}: expected a folder or a .tar/.tar.gz/.tgz archive")

    buffers = {s: _SplitBuffer() for s in _SPLITS}
    shape: tuple[int, int, int] | None = None
    first = ""
    in_tar = path.is_file()
    for split, cls, where, data in entries:
        source = f"{path}: {where}" if in_tar else where
        pixels, img_shape = _decode_image(data, source)
        if shape is None:
            shape, first = img_shape, where
        elif img_shape != shape:
            raise DataError(
                f"{source}: image is {img_shape} (H, W, C) but {first} is {shape}; all images of a "
                f"data set must have the same size and mode"
            )
        buffers[split].pixels += pixels
        buffers[split].keys.append((cls, where))
    for split in _SPLITS:
        if not buffers[split].keys:
            raise DataError(f"{path}: no images (.jpg, .jpeg, .png) under {split}/<class>/")
    if shape is None:  # unreachable after the check above; narrows the type
        raise DataError(f"{path}: no images")
    classes = sorted({k[0] for k in buffers["train"].keys})
    extra = sorted({k[0] for k in buffers["test"].keys} - set(classes))
    if extra:
        raise DataError(f"{path}: test/ has class folder(s) {extra} that train/ lacks")
    labels = {c: i for i, c in enumerate(classes)}
    train_x, train_y = buffers["train"].arrays(shape, labels)
    test_x, test_y = buffers["test"].arrays(shape, labels)
    return Dataset(name, train_x, train_y, test_x, test_y, tuple(classes))


def _image_folder_sources(path: Path) -> list[Path]:
    if path.is_dir():
        return [f for _, _, f in _folder_files(_split_root(path))]
    return [path]
