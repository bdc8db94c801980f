"""Byte-level text corpora for federated next-character prediction, one client per natural group.

Two sources, both read from local files only:

``python-stdlib-text``
    The Python standard library's own source files of the running interpreter
    (a corpus that exists offline on every machine with Python). A fixed list of
    files, :data:`STDLIB_FILES`, present in CPython 3.10 to 3.13, is grouped
    into one client per top-level package (``json``, ``email``, ``asyncio``
    ...). The bytes differ between interpreter versions, so the corpus's
    SHA-256 (:attr:`TextCorpus.sha256`) is what identifies it: a run records it
    in its ``meta.json``.
``text``
    Any folder of text files (``root``): one client per sub-folder (every file
    below it, recursively) if the folder has sub-folders, else one client per
    file. Hidden files and folders (a leading ``.``) are skipped.

Test split: the *tail of every file*. Each file's last :data:`TEST_FRACTION`
of bytes is held out for testing, its head is for training, so every client
and every file is represented in the test text, and no training window ever
overlaps a test window. Files are concatenated in list order (sorted order for
a folder) within a client.

Examples are windows of ``context + 1`` consecutive bytes: the input is the
first ``context`` bytes, the target the same window shifted by one (the next
byte at every position). :func:`text_windows` draws each client's training
windows at seeded random offsets and tiles the test text with non-overlapping
windows.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedquant.errors import DataError, InvalidInputError
from fedquant.fl.data.dataset import StrPath
from fedquant.fl.names import FOLDER_NAME, STDLIB_NAME

#: the share of every file's bytes (its tail) held out for testing
TEST_FRACTION = 0.1
#: bytes: the vocabulary of a byte-level model
VOCAB_SIZE = 256

#: The built-in corpus: client (a top-level standard-library package) -> its files,
#: relative to the standard library folder. Every file exists in CPython 3.10-3.13.
STDLIB_FILES: dict[str, tuple[str, ...]] = {
    "json": (
        "json/__init__.py",
        "json/decoder.py",
        "json/encoder.py",
        "json/scanner.py",
        "json/tool.py",
    ),
    "email": (
        "email/message.py",
        "email/feedparser.py",
        "email/generator.py",
        "email/header.py",
        "email/utils.py",
        "email/charset.py",
        "email/_policybase.py",
        "email/policy.py",
        "email/parser.py",
    ),
    "asyncio": (
        "asyncio/events.py",
        "asyncio/futures.py",
        "asyncio/tasks.py",
        "asyncio/queues.py",
        "asyncio/locks.py",
        "asyncio/streams.py",
    ),
    "logging": ("logging/__init__.py", "logging/handlers.py", "logging/config.py"),
    "http": ("http/__init__.py", "http/client.py", "http/server.py", "http/cookies.py"),
    "urllib": (
        "urllib/parse.py",
        "urllib/request.py",
        "urllib/error.py",
        "urllib/response.py",
        "urllib/robotparser.py",
    ),
    "xml": (
        "xml/dom/minidom.py",
        "xml/dom/pulldom.py",
        "xml/etree/ElementTree.py",
        "xml/sax/saxutils.py",
        "xml/sax/handler.py",
    ),
    "unittest": (
        "unittest/case.py",
        "unittest/loader.py",
        "unittest/main.py",
        "unittest/result.py",
        "unittest/runner.py",
        "unittest/suite.py",
        "unittest/util.py",
    ),
    "concurrent": (
        "concurrent/futures/__init__.py",
        "concurrent/futures/_base.py",
        "concurrent/futures/process.py",
        "concurrent/futures/thread.py",
    ),
    "importlib": (
        "importlib/__init__.py",
        "importlib/abc.py",
        "importlib/machinery.py",
        "importlib/util.py",
        "importlib/_bootstrap.py",
    ),
}


@dataclass(frozen=True, eq=False)
class TextCorpus:
    """A byte corpus split into clients, each with a train and a test text.

    Attributes
    ----------
    name : str
        ``"python-stdlib-text"`` or ``"text"``.
    root : str
        The folder the files were read from.
    clients : tuple of str
        Client names (a package, a sub-folder or a file name).
    files : tuple of tuple of str
        Per client, its files relative to ``root``, in concatenation order.
    train, test : tuple of bytes
        Per client, the heads and the tails of its files, concatenated.
    sha256 : str
        SHA-256 over every file's relative path and bytes, in order (see
        :func:`corpus_sha256`): the corpus's identity.
    """

    name: str
    root: str
    clients: tuple[str, ...]
    files: tuple[tuple[str, ...], ...]
    train: tuple[bytes, ...]
    test: tuple[bytes, ...]
    sha256: str

    @property
    def num_bytes(self) -> int:
        """Total size of the corpus in bytes (train + test)."""
        return sum(len(t) for t in self.train) + sum(len(t) for t in self.test)

    def describe(self) -> dict[str, object]:
        """A JSON-ready summary: name, root, hash, and per client its files and sizes."""
        return {
            "name": self.name,
            "root": self.root,
            "sha256": self.sha256,
            "bytes": self.num_bytes,
            "test_fraction": TEST_FRACTION,
            "clients": [
                {"name": c, "files": list(f), "train_bytes": len(tr), "test_bytes": len(te)}
                for c, f, tr, te in zip(
                    self.clients, self.files, self.train, self.test, strict=True
                )
            ],
        }


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder (``sysconfig``'s ``stdlib`` path)."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_sha256(root: Path, groups: Sequence[Sequence[str]], blobs: Sequence[bytes]) -> str:
    """SHA-256 over ``relative path NUL length NUL bytes`` of every file, in client order."""
    h = hashlib.sha256()
    it = iter(blobs)
    for group in groups:
        for rel in group:
            data = next(it)
            h.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()


def split_file(data: bytes, test_fraction: float = TEST_FRACTION) -> tuple[bytes, bytes]:
    """``(head, tail)`` of one file: the tail is its last ``round(test_fraction * len)`` bytes.

    >>> split_file(b"0123456789")
    (b'012345678', b'9')
    """
    cut = len(data) - round(test_fraction * len(data))
    return data[:cut], data[cut:]


def _build(name: str, root: Path, groups: dict[str, tuple[str, ...]]) -> TextCorpus:
    blobs: list[bytes] = []
    train: list[bytes] = []
    test: list[bytes] = []
    for client, rels in groups.items():
        heads, tails = [], []
        for rel in rels:
            path = root / rel
            try:
                data = path.read_bytes()
            except OSError as e:
                raise DataError(f"{name}: cannot read {path}: {e.strerror or e}") from e
            blobs.append(data)
            head, tail = split_file(data)
            heads.append(head)
            tails.append(tail)
        train.append(b"".join(heads))
        test.append(b"".join(tails))
        if not train[-1] or not test[-1]:
            raise DataError(
                f"{name}: client {client!r} ({', '.join(rels)}) has {len(train[-1])} training and "
                f"{len(test[-1])} test bytes; expected files of at least 10 bytes in all"
            )
    groups_t = tuple(groups.values())
    return TextCorpus(
        name=name,
        root=str(root),
        clients=tuple(groups),
        files=groups_t,
        train=tuple(train),
        test=tuple(test),
        sha256=corpus_sha256(root, groups_t, blobs),
    )


def load_stdlib_corpus(root: StrPath | None = None) -> TextCorpus:
    """The built-in corpus: :data:`STDLIB_FILES` read from the standard library.

    Parameters
    ----------
    root : str or os.PathLike, optional
        Another copy of a standard library folder; default :func:`stdlib_root`.

    Raises
    ------
    DataError
        If a listed file is missing (naming it and the folder searched).
    """
    base = Path(root).expanduser() if root is not None else stdlib_root()
    missing = [rel for rels in STDLIB_FILES.values() for rel in rels if not (base / rel).is_file()]
    if missing:
        raise DataError(
            f"{STDLIB_NAME}: {len(missing)} of the corpus's files are missing from {base}: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; expected a CPython "
            "3.10-3.13 standard library folder"
        )
    return _build(STDLIB_NAME, base, dict(STDLIB_FILES))


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def folder_groups(root: Path) -> dict[str, tuple[str, ...]]:
    """Client name -> files (relative to ``root``) of a user folder (see the module docstring)."""
    entries = sorted(p for p in root.iterdir() if _visible(p))
    subdirs = [p for p in entries if p.is_dir()]
    if not subdirs:
        return {p.name: (p.name,) for p in entries if p.is_file()}
    loose = [p.name for p in entries if p.is_file()]
    if loose:
        raise DataError(
            f"{FOLDER_NAME}: {root} has both sub-folders (one client each) and loose files "
            f"({', '.join(loose[:3])}{' ...' if len(loose) > 3 else ''}); expected only "
            "sub-folders (one client per sub-folder) or only files (one client per file)"
        )
    groups: dict[str, tuple[str, ...]] = {}
    for d in subdirs:
        files = sorted(
            p.relative_to(root).as_posix()
            for p in d.rglob("*")
            if p.is_file() and all(not part.startswith(".") for part in p.relative_to(root).parts)
        )
        if files:
            groups[d.name] = tuple(files)
    return groups


def load_text_folder(root: StrPath | None) -> TextCorpus:
    """A user's folder of text files: one client per sub-folder, or per file.

    Raises
    ------
    DataError
        If ``root`` is not given, is not a folder, holds no file, or holds both
        sub-folders and loose files.
    """
    how = "a folder of text files (one client per file) or of sub-folders (one client each)"
    if root is None:
        raise DataError(f"{FOLDER_NAME}: no root given; pass root=PATH (--data-root), {how}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"{FOLDER_NAME}: {path} is not a folder; expected {how}")
    groups = folder_groups(path)
    if not groups:
        raise DataError(f"{FOLDER_NAME}: {path} holds no (visible) file; expected {how}")
    return _build(FOLDER_NAME, path, groups)


@dataclass(frozen=True, eq=False)
class Windows:
    """Examples of next-byte prediction: ``y[:, t]`` is the byte after ``x[:, t]``.

    Attributes
    ----------
    x, y : torch.Tensor
        ``int64`` of shape ``(N, context)``, values in ``[0, 256)``.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _gather(text: np.ndarray, starts: np.ndarray, context: int) -> Windows:
    idx = starts[:, None] + np.arange(context + 1)[None, :]
    w = torch.from_numpy(text[idx].astype(np.int64))
    return Windows(x=w[:, :-1].contiguous(), y=w[:, 1:].contiguous())


def sample_windows(
    text: bytes, context: int, count: int, rng: np.random.Generator, *, where: str = "text"
) -> Windows:
    """``count`` windows of ``text`` at offsets drawn uniformly (with replacement) by ``rng``.

    Raises
    ------
    InvalidInputError
        If ``text`` is shorter than one window (``context + 1`` bytes).
    """
    arr = np.frombuffer(text, dtype=np.uint8)
    n_starts = arr.size - context
    if n_starts < 1:
        raise InvalidInputError(
            f"{where}: {arr.size} bytes is too short for one window of context {context}; "
            f"expected at least {context + 1} bytes"
        )
    return _gather(arr, np.sort(rng.integers(0, n_starts, size=count)), context)


def tile_windows(text: bytes, context: int, limit: int = 0) -> Windows:
    """Non-overlapping windows covering ``text`` from its start (at most ``limit``; 0 = all).

    With a limit below the number of windows that fit, they are spread evenly
    over the text (every ``k``-th window) rather than taken from its start.
    """
    arr = np.frombuffer(text, dtype=np.uint8)
    fit = max(0, (arr.size - 1) // context)
    starts = np.arange(fit, dtype=np.int64) * context
    if limit and fit > limit:
        starts = starts[np.linspace(0, fit - 1, limit).round().astype(np.int64)]
    return _gather(arr, starts, context)


@dataclass(frozen=True, eq=False)
class TextSplits:
    """A corpus cut into examples: per-client training windows and the shared test windows.

    Attributes
    ----------
    clients : list of Windows
        Client ``k``'s training windows (its natural share of the corpus).
    test : Windows
        Test windows of every client's held-out text, client by client.
    context : int
        Bytes of context per example.
    """

    clients: list[Windows]
    test: Windows
    context: int


def text_windows(
    corpus: TextCorpus,
    *,
    context: int,
    train_windows: int,
    test_windows: int,
    rng_for_client: Callable[[int], np.random.Generator],
) -> TextSplits:
    """Cut ``corpus`` into windows: seeded random ones for training, tiled ones for testing.

    Parameters
    ----------
    corpus : TextCorpus
    context : int
        Bytes of context per example (>= 1).
    train_windows : int
        Windows per client, at most: a client gets ``min(train_windows,
        len(train text) // context)`` (at least 1) windows at random offsets.
    test_windows : int
        Test windows in all, at most; each client contributes up to
        ``ceil(test_windows / clients)`` non-overlapping windows of its test text,
        spread evenly over it.
    rng_for_client : callable
        ``k -> numpy.random.Generator`` drawing client ``k``'s offsets.

    Raises
    ------
    DataError
        If a client's training or test text is shorter than one window.
    """
    if context < 1 or train_windows < 1 or test_windows < 1:
        raise InvalidInputError(
            f"text_windows: context={context}, train_windows={train_windows}, "
            f"test_windows={test_windows}; expected integers >= 1"
        )
    per_client_test = -(-test_windows // len(corpus.clients))
    clients, tests = [], []
    for k, (name, train, test) in enumerate(
        zip(corpus.clients, corpus.train, corpus.test, strict=True)
    ):
        need = context + 1
        if len(train) < need or len(test) < need:
            raise DataError(
                f"{corpus.name}: client {name!r} has {len(train)} training and {len(test)} test "
                f"bytes; a window of context {context} needs {need} of each (its files' last "
                f"{TEST_FRACTION:.0%} are the test text), so expected at least "
                f"{need * round(1 / TEST_FRACTION)} bytes of files"
            )
        count = max(1, min(train_windows, len(train) // context))
        clients.append(sample_windows(train, context, count, rng_for_client(k), where=name))
        tests.append(tile_windows(test, context, per_client_test))
    test_all = Windows(x=torch.cat([t.x for t in tests]), y=torch.cat([t.y for t in tests]))
    return TextSplits(clients=clients, test=test_all, context=context)
