"""The data set names a run accepts: one registry for the configuration and the loaders.

Torch-free, so :mod:`fedquant.fl.config` can validate ``--dataset`` without
importing the loaders (:func:`fedquant.fl.data.load_dataset` for the image data
sets, :mod:`fedquant.fl.text_task` for the text ones).
"""

from __future__ import annotations

__all__ = ["DATASETS", "FOLDER_NAME", "IMAGE_DATASETS", "STDLIB_NAME", "TEXT_DATASETS"]

#: image data sets :func:`fedquant.fl.data.load_dataset` reads, the default first
IMAGE_DATASETS = (
    "mnist-embedded",
    "mnist",
    "fashion-mnist",
    "cifar10",
    "cifar10-jpeg",
    "imagefolder",
)
#: the text corpus of the running Python's standard library (one client per package)
STDLIB_NAME = "python-stdlib-text"
#: a text corpus read from a folder (one client per sub-folder or file)
FOLDER_NAME = "text"
#: text data sets (next-character prediction, :mod:`fedquant.fl.text_task`)
TEXT_DATASETS = (STDLIB_NAME, FOLDER_NAME)
#: every name ``--dataset`` accepts
DATASETS = IMAGE_DATASETS + TEXT_DATASETS
