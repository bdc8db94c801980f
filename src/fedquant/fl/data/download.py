"""Downloading the official files, verified by SHA-256 (:func:`fetch`)."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from fedquant.errors import ConfigError, DataError
from fedquant.fl.data.cifar import _CIFAR_TARBALL
from fedquant.fl.data.dataset import StrPath

_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"

#: file name -> SHA-256 of the official files, per data set.
_DIGESTS: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    # the official files; the Debian package's are re-compressed (other digests, same data)
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
    "cifar10": {
        _CIFAR_TARBALL: "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
    },
}
_BASE_URLS = {"mnist": _MNIST_URL, "fashion-mnist": _FASHION_URL, "cifar10": _CIFAR_URL}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, dest: Path, digest: str, timeout: float) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != digest.lower():
            raise DataError(
                f"{url}: SHA-256 {h.hexdigest()} does not match the expected {digest}; the "
                f"download was removed (a corrupt transfer or a changed file on the server)"
            )
        os.replace(tmp, dest)
    except DataError:
        tmp.unlink(missing_ok=True)
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{url}: download failed: {e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fetch(
    name: str,
    root: StrPath,
    *,
    base_url: str | None = None,
    timeout: float = 60.0,
    digests: Mapping[str, str] | None = None,
) -> Path:
    """Download a data set's official files into ``root`` and verify them.

    Each file is streamed to a temporary file in ``root``, its SHA-256 checked
    against the known digest, then renamed into place; on a mismatch or an
    error the partial file is removed. Files already present with the right
    digest are not downloaded again. :func:`load_dataset` never calls this.

    =================  ===============================================  ==========================
    name               default source                                   files
    =================  ===============================================  ==========================
    ``mnist``          ``https://ossci-datasets.s3.amazonaws.com/mnist/``  the four ``*-ubyte.gz``
                       (mirror of ``http://yann.lecun.com/exdb/mnist/``)
    ``fashion-mnist``  ``http://fashion-mnist.s3-website.eu-central-1``  the four ``*-ubyte.gz``
                       ``.amazonaws.com/``
    ``cifar10``        ``https://www.cs.toronto.edu/~kriz/``              ``cifar-10-python.tar.gz``
    =================  ===============================================  ==========================

    Parameters
    ----------
    name : {"mnist", "fashion-mnist", "cifar10"}
        The data set.
    root : str or os.PathLike
        Destination folder (created if needed); pass the same path to
        :func:`load_dataset`.
    base_url : str, optional
        Another http(s) location holding the same file names (a mirror).
    timeout : float, default 60.0
        Seconds to wait for the server at each step.
    digests : mapping of str to str, optional
        ``{file name: sha256 hex}`` replacing the built-in table (and the
        list of files fetched), e.g. for a private mirror.

    Returns
    -------
    pathlib.Path
        ``root``.

    Raises
    ------
    ConfigError
        If ``name`` cannot be fetched or ``base_url`` is not http(s).
    DataError
        If a download fails or a digest does not match.
    """
    if name not in _DIGESTS:
        raise ConfigError(
            "dataset", f"cannot fetch {name!r}; expected one of: {', '.join(_DIGESTS)}"
        )
    base = base_url if base_url is not None else _BASE_URLS[name]
    if urllib.parse.urlsplit(base).scheme not in ("http", "https"):
        raise ConfigError("base_url", f"expected an http:// or https:// URL, got {base!r}")
    table = dict(digests) if digests is not None else _DIGESTS[name]
    dest_dir = Path(root).expanduser()
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{dest_dir}: cannot create the download folder: {e}") from e
    for fname, digest in table.items():
        dest = dest_dir / fname
        if dest.is_file() and _sha256(dest) == digest.lower():
            continue
        _download(base.rstrip("/") + "/" + urllib.parse.quote(fname), dest, digest, timeout)
    return dest_dir
