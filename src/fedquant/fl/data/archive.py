"""Reading compressed files and tar archives with their integrity checked, and bounded.

Every archive a loader reads goes through here, so damage is never silent:

* **Checksums.** gzip members end with a CRC-32 and the length of their data,
  bzip2 blocks carry CRCs, xz streams a check: the stream is always read to its
  end, so a flipped byte anywhere in it is a :class:`DataError`, not changed
  pixels.
* **Tar structure.** A header with a bad checksum, a short header or an
  archive that ends without its end-of-archive marker is an error (Python's
  :mod:`tarfile` takes a bad header after the first member for the end of the
  archive, which silently loses the members behind it). After the marker only
  zero bytes may follow.
* **Bounded decompression.** A compressed file may expand to at most
  :data:`MAX_EXPANSION_RATIO` times its size plus :data:`EXPANSION_ALLOWANCE`
  bytes; past that, reading stops with a :class:`DataError` before the output
  is held in memory (a decompression bomb). The real data sets stay far below
  (MNIST's gzip files expand 2-5x, CIFAR-10's tarball 1.1x). A genuine file
  beyond the bound can be decompressed beforehand and read as it is.

Every error is one :class:`DataError` naming the file.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from fedquant.errors import DataError

#: a compressed file may decompress to at most this many times its size ...
MAX_EXPANSION_RATIO = 16
#: ... plus this many bytes (small files compress better than large ones)
EXPANSION_ALLOWANCE = 64 << 20

_CHUNK = 1 << 20
#: errors a damaged compressed stream or tar archive raises while being read
_READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, tarfile.TarError)


def expansion_limit(compressed_size: int) -> int:
    """The most bytes a compressed file of ``compressed_size`` bytes may decompress to."""
    return MAX_EXPANSION_RATIO * compressed_size + EXPANSION_ALLOWANCE


class _Bounded(io.RawIOBase):
    """A read-only stream over a decompressor that refuses to produce more than ``limit`` bytes."""

    def __init__(self, inner: IO[bytes], limit: int, source: Path, size: int) -> None:
        super().__init__()
        self._inner = inner
        self._limit = limit
        self._source = source
        self._size = size
        self.produced = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        data = self._inner.read(min(len(view), self._limit - self.produced + 1))
        self.produced += len(data)
        if self.produced > self._limit:
            raise DataError(
                f"{self._source}: decompresses to more than {self._limit:,} bytes "
                f"({MAX_EXPANSION_RATIO}x its {self._size:,} bytes + "
                f"{EXPANSION_ALLOWANCE >> 20} MiB): refused as a likely decompression bomb; "
                "if the file is genuine, decompress it beforehand and use the result"
            )
        view[: len(data)] = data
        return len(data)


def _decompressor(raw: IO[bytes], head: bytes) -> tuple[str, Any]:
    """(format name, decompressing reader or None for an uncompressed file)."""
    if head[:2] == b"\x1f\x8b":
        return "gzip", gzip.GzipFile(fileobj=raw, mode="rb")
    if head[:3] == b"BZh":
        return "bzip2", bz2.BZ2File(raw, "rb")
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz", lzma.LZMAFile(raw, "rb")
    return "", None


@contextlib.contextmanager
def open_decompressed(path: Path) -> Iterator[IO[bytes]]:
    """``path`` as a binary stream, decompressed if it is gzip, bzip2 or xz (by content).

    A compressed stream is bounded by :func:`expansion_limit`; read it to its
    end (``read()`` returning ``b""``) to have its checksum verified. Errors
    while reading are :class:`DataError` naming ``path``.
    """
    try:
        raw = open(path, "rb")  # closed by the with below
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
    kind = "compressed"
    try:
        with raw:
            head = raw.read(6)
            raw.seek(0)
            kind, inner = _decompressor(raw, head)
            if inner is None:
                yield raw
                return
            size = path.stat().st_size
            with (
                inner,
                io.BufferedReader(_Bounded(inner, expansion_limit(size), path, size), _CHUNK) as f,
            ):
                yield f
    except DataError:
        raise
    except _READ_ERRORS as e:
        raise DataError(f"{path}: corrupt or truncated {kind} data: {e}") from e


def read_decompressed(path: Path) -> bytes:
    """The whole content of ``path``, decompressed and checksum-verified (see :func:`open_decompressed`)."""
    with open_decompressed(path) as f:
        return f.read()


# tarfile's header errors (not in its __all__, nor in the type stubs)
_EOF_HEADER: type[Exception] = tarfile.EOFHeaderError  # type: ignore[attr-defined]
_EMPTY_HEADER: type[Exception] = tarfile.EmptyHeaderError  # type: ignore[attr-defined]
_BAD_HEADER: tuple[type[Exception], ...] = (
    tarfile.TruncatedHeaderError,  # type: ignore[attr-defined]
    tarfile.InvalidHeaderError,  # type: ignore[attr-defined]
)


class _StrictTarInfo(tarfile.TarInfo):
    """A header that is damaged ends the reading with an error, not the archive."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> Any:
        try:
            return super().fromtarfile(tarfile_)
        except _EOF_HEADER:
            raise  # a zero block: the end-of-archive marker
        except _EMPTY_HEADER:
            raise _TarDamage("the archive ends without its end-of-archive marker") from None
        except _BAD_HEADER as e:
            raise _TarDamage(f"damaged member header at byte {tarfile_.offset:,}: {e}") from e


class _TarDamage(DataError):
    """Raised inside tarfile's header loop (which catches only its own header errors)."""


@contextlib.contextmanager
def open_tar(path: Path) -> Iterator[Iterator[tuple[tarfile.TarInfo, IO[bytes] | None]]]:
    """Stream the members of a ``.tar`` (optionally gzip/bzip2/xz) with its structure checked.

    Yields an iterator of ``(member, file or None)``; each member's file must be
    read before the next member is taken. Once the iterator is exhausted the
    archive's end (zero blocks only) and the compressed stream's checksum have
    been verified. Any damage is a :class:`DataError` naming ``path``.
    """

    def members(tf: tarfile.TarFile, stream: IO[bytes]) -> Iterator[tuple[Any, IO[bytes] | None]]:
        for m in tf:
            yield m, tf.extractfile(m) if m.isfile() else None
        rest: IO[bytes] = tf.fileobj  # type: ignore[assignment]  # set in read mode
        while chunk := rest.read(_CHUNK):  # what follows the end-of-archive marker
            if chunk.count(0) != len(chunk):
                raise DataError(
                    f"{path}: data after the end-of-archive marker (a damaged header ends the "
                    "archive early?)"
                )
        while stream.read(_CHUNK):  # the rest of the compressed stream, for its checksum
            pass

    try:
        with (
            open_decompressed(path) as stream,
            tarfile.open(fileobj=stream, mode="r|", tarinfo=_StrictTarInfo) as tf,
        ):
            yield members(tf, stream)
    except _TarDamage as e:
        raise DataError(f"{path}: corrupt tar archive: {e}") from e
    except DataError:
        raise
    except _READ_ERRORS as e:
        raise DataError(f"{path}: corrupt or truncated tar archive: {e}") from e
