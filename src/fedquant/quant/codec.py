"""The wire format of a model update: :func:`encode` and :func:`decode`.

The byte length of an encoded payload is the traffic fedquant reports: nothing
is simulated. There is no pickle anywhere; every field is checked on decode.

Layout (version 2, all integers little-endian)::

    header (24 bytes)
      magic        4s   b"FQNT"
      version      u16  2 (1 is read too: the same layout, another checksum)
      flags        u16  0 (reserved)
      total_len    u64  bytes in the whole payload, header and checksum included
      n_tensors    u32
      meta_len     u32  bytes of metadata that follow
    meta           meta_len bytes: a UTF-8 JSON object of scalar values (may be empty)
    n_tensors records
      name_len     u16, then the UTF-8 name (1..1024 bytes, unique)
      dtype        u8   original dtype (see DTYPES)
      kind         u8   0 = quantized, 1 = float32 raw, 2 = integer raw (in `dtype`)
      bits         u8   1..8 if quantized; 32 for float32 raw; 8*itemsize for integer raw
      granularity  u8   0 = per tensor, 1 = per output channel (dim 0)
      transform    u8   0 = none, 1 = randomized Hadamard rotation (quantized only)
      coding       u8   0 = packed codes, 1 = rANS-coded codes (quantized only)
      ndim         u8   0..16
      reserved     u8   0
      dims         ndim x u64
      n_scales     u32  1 (per tensor) or dims[0] (per channel) if quantized, else 0
      scales       n_scales x f32   clipping thresholds s (finite, >= 0)
      mse          f64  measured quantization MSE of this tensor (finite, >= 0)
      data_len     u64  must equal ceil(numel*bits/8), 4*numel or itemsize*numel
                        (transform = coding = 0; otherwise see below)
      data         packed codes (fedquant.quant.packing) / raw little-endian values
    crc32c         u32  CRC-32C (Castagnoli) of every byte before it; in version 1,
                        zlib.crc32 (see :func:`checksum`)

A quantized record's data, when ``transform`` or ``coding`` is not 0::

    transform = 1: a 6-byte sub-header, then the codes of the rotated rows
      block_log2   u8   the largest block is 2**block_log2 (0..24)
      min_log2     u8   the padding unit is 2**min_log2 (0..block_log2)
      key_check    u32  tensor_key(shared_key, name).check
    codes: rows x padded of them, where rows = dims[0] (per channel) or 1,
      padded = padded_length(numel / rows, 2**block_log2, 2**min_log2)
      (fedquant.quant.rotation); the scales and the MSE are those of the
      rotated rows (the MSE measured on the original values)
    coding = 0: exactly ceil(codes*bits/8) packed bytes
    coding = 1: the rANS table and stream (fedquant.quant.entropy), at least
      one byte per 8 codes, decoding to exactly `codes` codes

The rotation's signs are never sent: the receiver derives them from a shared
key it already has (``decode(payload, shared_key=...)``). ``key_check`` lets it
refuse a payload made with another key instead of decoding garbage. A version-1
decoder that predates these features refuses any nonzero ``transform`` or
``coding`` byte, so they did not change the version. Version 2 changed the
checksum from zlib's CRC-32 to CRC-32C, which CPUs compute
with dedicated instructions at about memory speed; version-1 payloads still decode.

Where each field lies is known to one walker, :mod:`fedquant.quant.wire`
(also used by the fuzzer and the hostile-client modes); this module says what
each field may hold.

Decoding validates the header, the total length and the checksum first, then
every field against the bytes actually present before allocating anything, so
a hostile payload costs at most ``O(len(payload))`` memory (a quantized tensor
expands by at most 32/bits, an entropy-coded one by at most 32) and raises
:class:`~fedquant.errors.DecodeError`.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import struct
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np

from fedquant.errors import DecodeError, InvalidInputError, NonFiniteError
from fedquant.quant import allocation, device, entropy, interop, kernels, rotation
from fedquant.quant.entropy import EntropyCoding
from fedquant.quant.grid import FLOAT_BITS, Rounding, num_steps
from fedquant.quant.packing import packed_size, unpack
from fedquant.quant.quantizer import (
    Granularity,
    SeedLike,
    dequantize_packed,
    quantize_rows,
    rng_key,
    row_thresholds,
    row_view,
)
from fedquant.quant.spec import QuantSpec, TensorPlan
from fedquant.quant.wire import (
    CRC,
    HEADER,
    KIND_FLOAT,
    KIND_INT,
    KIND_QUANT,
    MAGIC,
    MSE_LEN,
    READ_VERSIONS,
    RECORD_FIXED,
    U16,
    U32,
    VERSION,
    Cursor,
    Header,
    Record,
    checksum,
    data_size,
    pack_head,
    read_header,
    read_record,
    reseal,
)

__all__ = [
    "CODING_PACKED",
    "CODING_RANS",
    "DTYPES",
    "KIND_FLOAT",
    "KIND_INT",
    "KIND_QUANT",
    "MAGIC",
    "READ_VERSIONS",
    "TRANSFORM_HADAMARD",
    "TRANSFORM_NONE",
    "VERSION",
    "DecodedUpdate",
    "EncodeResult",
    "TensorInfo",
    "checksum",
    "decode",
    "decode_inspected",
    "describe_payload",
    "device_plan",
    "encode",
    "encode_with_stats",
    "peek_header",
    "reseal",
]

MAX_NAME = 1024
MAX_NDIM = 16
MAX_META = 1 << 20
MAX_DIM = 1 << 48

#: what ``encode(..., seed=)`` takes: also a tuple of ints such as ``(round, client)``
EncodeSeed = SeedLike | tuple[int, ...]

#: smallest possible record: a 1-byte name, no dims (0-d), no scales, mse and data_len,
#: and one data byte (a 0-d int8/uint8/bool tensor; a 0-d float32 has 4)
_MIN_RECORD = U16.size + 1 + RECORD_FIXED.size + U32.size + MSE_LEN.size + 1

TRANSFORM_NONE, TRANSFORM_HADAMARD = 0, 1
CODING_PACKED, CODING_RANS = 0, 1
_ROT_HEADER = struct.Struct("<BBI")
_GRAN = {Granularity.TENSOR: 0, Granularity.CHANNEL: 1}
_GRAN_BACK = {v: k for k, v in _GRAN.items()}

#: dtype codes on the wire -> (name, numpy dtype used for raw integer data)
DTYPES: dict[int, tuple[str, np.dtype | None]] = {
    1: ("float32", None),
    2: ("float16", None),
    3: ("bfloat16", None),
    4: ("float64", None),
    5: ("int64", np.dtype("<i8")),
    6: ("int32", np.dtype("<i4")),
    7: ("int16", np.dtype("<i2")),
    8: ("int8", np.dtype("i1")),
    9: ("uint8", np.dtype("u1")),
    10: ("bool", np.dtype("u1")),
}
_DTYPE_CODE = {name: code for code, (name, _) in DTYPES.items()}
#: the scales of an unquantized record (none; read-only, shared), and their count's bytes
_NO_SCALES = np.zeros(0, dtype=np.float32)
_NO_SCALES.flags.writeable = False
_NO_SCALES_COUNT = U32.pack(0)
#: ``str(dtype)`` of the native dtypes (``str`` of a dtype is slow: ~10 us per tensor)
_NAMES = {np.dtype(n): n for n in _DTYPE_CODE if n != "bfloat16"}


def _bytes_api() -> tuple[Any, Any] | None:
    """CPython's ``PyBytes_FromStringAndSize`` and ``PyBytes_AsString``, if reachable."""
    try:
        api = ctypes.pythonapi
        new = api.PyBytes_FromStringAndSize
        new.restype, new.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_ssize_t)
        addr = api.PyBytes_AsString
        addr.restype, addr.argtypes = ctypes.c_void_p, (ctypes.py_object,)
    except (AttributeError, OSError):  # not CPython
        return None
    return new, addr


_BYTES_API = _bytes_api()
#: payloads from this size on ask the kernel for huge pages, as NumPy does for its
#: large arrays: a fresh buffer then costs a few hundred page faults, not thousands
_HUGE_MIN = 1 << 22
_MADV_HUGEPAGE = 14  # Linux


def _madvise() -> Any:
    """Libc's ``madvise``, where there is one (Linux); else ``None``."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (AttributeError, OSError):
        return None
    fn.restype, fn.argtypes = ctypes.c_int, (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return fn


_MADVISE = _madvise() if sys.platform.startswith("linux") else None


def _new_payload(n: int) -> tuple[bytes | bytearray, np.ndarray]:
    """A new ``bytes`` object of ``n`` bytes and a writable uint8 view of its storage.

    The C-API idiom for building a ``bytes`` without a final copy: a bytes object
    made with ``PyBytes_FromStringAndSize(NULL, n)`` may be filled in place until it
    is shared (its hash is not computed before). The caller fills it through the
    view and drops the view before it returns the object (the view does not keep
    the object alive). Without CPython's C API: a ``bytearray``, which the caller
    turns into ``bytes`` (same bytes, one copy more).
    """
    if _BYTES_API is not None and n > 1:  # 0- and 1-byte objects are shared singletons
        new, addr = _BYTES_API
        obj = new(None, n)
        start = addr(obj)
        if _MADVISE is not None and n >= _HUGE_MIN:  # advice only: failure changes nothing
            page = 4096
            lo = -(-start // page) * page
            _MADVISE(lo, (start + n - lo) // page * page, _MADV_HUGEPAGE)
        storage = (ctypes.c_char * n).from_address(start)
        view = np.frombuffer(storage, dtype=np.uint8)  # type: ignore[call-overload]
        return obj, view
    arr = bytearray(n)
    return arr, np.frombuffer(arr, dtype=np.uint8)


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorInfo:
    """What the payload says about one tensor (immutable; built by keyword only)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    bits: int  # 1..8 quantized, 32 float32 raw, 8*itemsize integer raw
    granularity: Granularity
    scales: np.ndarray
    mse: float
    nbytes: int  # bytes of this tensor's record in the payload
    transform: int = TRANSFORM_NONE  # 1: rotated (blocks of up to ``block`` values)
    coding: int = CODING_PACKED  # 1: the codes are rANS-coded
    block: int = 0  # largest rotation block (0 if not rotated)
    codes: int = 0  # number of codes sent (numel, or rows x padded if rotated)

    @property
    def quantized(self) -> bool:
        """Whether the tensor travels quantized (a floating tensor at 1..8 bits)."""
        return self.bits <= 8 and self.dtype in ("float32", "float16", "bfloat16", "float64")

    @property
    def numel(self) -> int:
        """Number of elements of the tensor."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class EncodeResult:
    """An encoded update and what the client measured while encoding it."""

    payload: bytes
    tensors: dict[str, TensorInfo]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Size of the payload in bytes: what travels."""
        return len(self.payload)

    @property
    def float32_nbytes(self) -> int:
        """Bytes of the same tensors as raw float32 (integers at their own size)."""
        return sum(_float32_size(i) for i in self.tensors.values())

    @property
    def mse(self) -> dict[str, float]:
        """Quantization MSE of each tensor, by name (0 for tensors sent exactly)."""
        return {n: i.mse for n, i in self.tensors.items()}


@dataclass(frozen=True)
class DecodedUpdate:
    """A decoded update: values (float32 for floating tensors), per-tensor info, metadata.

    An update from :func:`describe_payload` has no values but remembers where each
    tensor's data lies in the payload, so :func:`decode_inspected` can produce
    them later without parsing the payload again.
    """

    tensors: dict[str, np.ndarray]
    info: dict[str, TensorInfo]
    meta: dict[str, Any]
    nbytes: int
    _source: _Source | None = field(default=None, repr=False, compare=False)

    @property
    def mse(self) -> dict[str, float]:
        """Quantization MSE each tensor's record reports, by name."""
        return {n: i.mse for n, i in self.info.items()}

    def to_torch(self) -> dict[str, Any]:
        """The values as torch tensors in the dtypes they were sent in.

        ``model.load_state_dict(decode(payload).to_torch())`` loads a decoded
        update. Needs PyTorch (:func:`fedquant.quant.interop.to_torch`).
        """
        if self.info and not self.tensors:
            raise InvalidInputError(
                "to_torch: this update has no values (it came from describe_payload()); use decode()"
            )
        return interop.to_torch(self.tensors, {n: i.dtype for n, i in self.info.items()})


class _Data(NamedTuple):
    """Where a validated record's data lies, and how to turn it into values."""

    data: memoryview  # the record's data bytes (sub-header included if extended)
    kind: int
    raw_dtype: np.dtype | None


@dataclass(frozen=True)
class _Source:
    """The payload an inspected update came from, and its records' data."""

    buf: memoryview
    crc: int
    version: int
    data: tuple[_Data, ...]


def _float32_size(info: TensorInfo) -> int:
    if info.dtype in ("float32", "float16", "bfloat16", "float64"):
        return 4 * info.numel
    return (info.bits // 8) * info.numel


# --------------------------------------------------------------------------- encode


class _OnDevice:
    """A floating torch tensor left on its device (a GPU) until its record is made.

    It is quantized there when the plan allows (:mod:`fedquant.quant.device`), else
    copied to the host. It looks like a float32 array where the encoder inspects it.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, t: Any) -> None:
        self.tensor = t.detach()
        self.shape = tuple(int(d) for d in t.shape)
        self.ndim = len(self.shape)

    def host(self) -> np.ndarray:
        return np.asarray(self.tensor.to("cpu").float().numpy())

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.host() if dtype is None else self.host().astype(dtype)


def _unsupported_dtype(name: str, dtype: str) -> InvalidInputError:
    return InvalidInputError(
        f"encode: tensor {name!r} has dtype {dtype}; supported: {', '.join(_DTYPE_CODE)}"
    )


def _as_numpy(name: str, t: Any) -> tuple[np.ndarray, str]:
    """(array, wire dtype name) of a numpy array or torch tensor, without importing torch."""
    if hasattr(t, "detach") and hasattr(t, "numpy"):
        dtype = str(t.dtype).removeprefix("torch.")
        where = f"encode: tensor {name!r}"
        if dtype not in _DTYPE_CODE:
            raise _unsupported_dtype(name, dtype)
        if getattr(t, "is_meta", False):
            raise InvalidInputError(
                f"{where} is on the meta device and has no values; expected a tensor with data "
                "(e.g. a model built on 'cpu', or after load_state_dict(..., assign=True))"
            )
        layout = str(getattr(t, "layout", "torch.strided"))
        if layout != "torch.strided":
            raise InvalidInputError(
                f"{where} has layout {layout}; expected a dense (strided) tensor, e.g. t.to_dense()"
            )
        try:
            if t.is_floating_point() and device.is_device_tensor(t):
                return _OnDevice(t), dtype  # type: ignore[return-value]
            if t.is_floating_point():
                return t.detach().to("cpu").float().numpy(), dtype
            return t.detach().to("cpu").numpy(), dtype
        except (RuntimeError, TypeError, NotImplementedError) as e:
            raise InvalidInputError(f"{where} cannot be read as an array: {e}") from e
    try:
        arr = np.asarray(t)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(
            f"encode: tensor {name!r} is not an array ({type(t).__name__}: {e}); expected a "
            "numpy array or torch tensor"
        ) from e
    if not arr.dtype.isnative:  # big-endian data: the same values in native order
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype == np.float64 and arr.size and np.nanmax(np.abs(arr), initial=0.0) > _F32_MAX:
        raise InvalidInputError(
            f"encode: tensor {name!r} holds float64 values up to "
            f"{np.nanmax(np.abs(arr)):.3g}, beyond float32's range (+-{_F32_MAX:.3g}); every "
            "tensor travels in float32 or fewer bits"
        )
    return arr, _NAMES.get(arr.dtype) or str(arr.dtype)


_F32_MAX = float(np.finfo(np.float32).max)


def _tensor_keys(seed: EncodeSeed, n: int) -> list[np.uint64] | None:
    """One independent 64-bit key per tensor, derived from the caller's seed.

    An int, tuple of ints or SeedSequence yields
    ``SeedSequence(seed).generate_state(n, uint64)`` (key ``i`` for the
    ``i``-th tensor); a Generator yields ``n`` draws.
    """
    if seed is None:
        return None
    if isinstance(seed, np.random.Generator):
        return [rng_key(seed, where="encode") for _ in range(n)]
    if isinstance(seed, (tuple, list)):
        if not seed or not all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0 for s in seed
        ):
            raise InvalidInputError(
                f"encode: seed={seed!r} is not usable; a tuple seed must hold non-negative ints, "
                "e.g. (round, client)"
            )
        seed = np.random.SeedSequence([int(s) for s in seed])
    if not isinstance(seed, np.random.SeedSequence):
        rng_key(seed, where="encode")  # validates the type and sign
        seed = np.random.SeedSequence(int(seed))
    return [np.uint64(k) for k in seed.generate_state(max(n, 1), np.uint64)[:n]]


def _meta_bytes(meta: Mapping[str, Any] | None) -> bytes:
    if not meta:
        return b""
    for k, v in meta.items():
        if not isinstance(k, str) or not (v is None or isinstance(v, (str, int, float, bool))):
            raise InvalidInputError(
                f"encode: meta[{k!r}]={v!r} is not allowed; expected str keys and "
                "str/int/float/bool/None values"
            )
        if isinstance(v, float) and not math.isfinite(v):
            raise InvalidInputError(f"encode: meta[{k!r}]={v!r} is not finite")
    raw = json.dumps(dict(meta), sort_keys=True, separators=(",", ":")).encode()
    if len(raw) > MAX_META:
        raise InvalidInputError(f"encode: meta is {len(raw)} bytes; at most {MAX_META} allowed")
    return raw


def _check_args(tensors: Any, spec: Any, meta: Any) -> QuantSpec:
    """The spec to use, after checking the types of :func:`encode`'s arguments."""
    if not isinstance(tensors, Mapping):
        hint = (
            "; pass model.state_dict(), not the model"
            if hasattr(tensors, "state_dict")
            else ", e.g. model.state_dict() or {'w': array}"
        )
        raise InvalidInputError(
            f"encode: tensors is a {type(tensors).__name__}; expected a mapping of name -> "
            f"array{hint}"
        )
    if spec is not None and not isinstance(spec, QuantSpec):
        raise InvalidInputError(
            f"encode: spec={spec!r} is not a QuantSpec; expected e.g. "
            "QuantSpec.from_strings(bits='4') or QuantSpec(default_bits=4)"
        )
    if meta is not None and not isinstance(meta, Mapping):
        raise InvalidInputError(
            f"encode: meta is a {type(meta).__name__}; expected a mapping of str -> scalar"
        )
    return spec if spec is not None else QuantSpec()


def _name_bytes(name: str) -> bytes:
    """A tensor name in UTF-8 (``b""`` if it cannot be encoded, e.g. a lone surrogate)."""
    try:
        return name.encode()
    except UnicodeEncodeError:
        return b""


def encode_with_stats(
    tensors: Mapping[str, Any],
    spec: QuantSpec | None = None,
    *,
    seed: EncodeSeed = None,
    meta: Mapping[str, Any] | None = None,
    shared_key: int | None = None,
) -> EncodeResult:
    """Encode a model update and report per-tensor bits, scales and measured MSE.

    Parameters
    ----------
    tensors : Mapping[str, np.ndarray | torch.Tensor]
        The update (e.g. a ``state_dict``), in order.
    spec : QuantSpec, optional
        How each tensor travels (default ``QuantSpec()``: weights at 8 bits,
        stochastic rounding, OCTAV).
        With a bit budget (``bits="auto:2.03"``) the widths are allocated
        from these tensors (:func:`fedquant.quant.allocation.allocate`).
    seed : int, tuple of int, np.random.Generator or SeedSequence, optional
        The randomness of stochastic rounding; each tensor gets an independent
        key derived from it. A tuple such as ``(round, client)`` is the
        entropy of a ``SeedSequence``. Without a seed, stochastic rounding
        draws fresh entropy from the operating system, as
        ``np.random.default_rng()`` does: two calls then give different
        payloads. Pass a seed to make encoding reproducible.
    meta : Mapping[str, scalar], optional
        Small metadata that travels with the payload (e.g. round, client id).
    shared_key : int, optional
        Required when the spec rotates (``spec.rotation``): a 64-bit key the
        receiver also knows (the simulator uses
        :func:`fedquant.fl.seeding.rotation_key` of the run seed and the round).
        Tensor ``name`` is rotated with ``rotation.tensor_key(shared_key, name)``.
        The key is never sent.

    Raises
    ------
    InvalidInputError
        Arguments of the wrong type, non-finite values, bad names, unsupported
        dtypes or layouts (sparse or meta torch tensors), a bad seed, a missing
        shared key.
    ConfigError
        The spec does not fit the model (e.g. ``4-2-2-4`` on a model with 5
        layers, a rule that matches no tensor).

    Examples
    --------
    >>> import numpy as np
    >>> update = {"w": np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)}
    >>> result = encode_with_stats(update, QuantSpec(default_bits=4), seed=(3, 17))
    >>> result.tensors["w"].bits, result.nbytes
    (4, 111)
    """
    spec = _check_args(tensors, spec, meta)
    if shared_key is not None:
        shared_key = rotation.check_shared_key(shared_key, "encode")
    arrays: dict[str, tuple[np.ndarray, str]] = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not 1 <= len(_name_bytes(name)) <= MAX_NAME:
            raise InvalidInputError(
                f"encode: tensor name {name!r} must be a str of 1..{MAX_NAME} bytes"
            )
        arr, dtype = _as_numpy(name, t)
        if dtype not in _DTYPE_CODE:
            raise _unsupported_dtype(name, dtype)
        if arr.ndim > MAX_NDIM:
            raise InvalidInputError(
                f"encode: tensor {name!r} has {arr.ndim} dims; at most {MAX_NDIM}"
            )
        arrays[name] = (arr, dtype)
    plans = spec.resolve({n: (a.shape, a.dtype.kind == "f") for n, (a, _) in arrays.items()})
    if spec.bit_budget is not None:  # bits="auto:B": widths allocated from these values
        plans = allocation.allocate({n: a for n, (a, _) in arrays.items()}, spec).plans
    needs_seed = any(p.quantized and p.rounding is Rounding.STOCHASTIC for p in plans.values())
    keys = _tensor_keys(seed, len(arrays))
    if needs_seed and keys is None:  # fresh OS entropy, as np.random.default_rng() does
        keys = _tensor_keys(np.random.SeedSequence(), len(arrays))
    if shared_key is None and any(p.quantized and p.rotation for p in plans.values()):
        raise InvalidInputError(
            "encode: the spec rotates (rotation=True), which needs shared_key= (an int in "
            "[0, 2**64) that the receiver also knows, e.g. fedquant.fl.seeding.rotation_key("
            "seed, round)); the key is never sent"
        )
    meta_raw = _meta_bytes(meta)

    records = [
        _encode_tensor(
            name, arr, dtype, plans[name], keys[i] if keys is not None else np.uint64(0), shared_key
        )
        for i, (name, (arr, dtype)) in enumerate(arrays.items())
    ]
    payload, infos = _assemble(records, meta_raw)
    return EncodeResult(payload=payload, tensors=infos, meta=dict(meta or {}))


def encode(
    tensors: Mapping[str, Any],
    spec: QuantSpec | None = None,
    *,
    seed: EncodeSeed = None,
    meta: Mapping[str, Any] | None = None,
    shared_key: int | None = None,
) -> bytes:
    """Encode a model update into a payload (see :func:`encode_with_stats`).

    ``encode(model.state_dict())`` works as is: weights at 8 bits, OCTAV
    clipping, stochastic rounding seeded from fresh operating-system entropy
    (pass ``seed=`` -- an int, a tuple such as ``(round, client)``, a
    ``SeedSequence`` or a ``Generator`` -- for the same payload every time).
    """
    return encode_with_stats(tensors, spec, seed=seed, meta=meta, shared_key=shared_key).payload


class _Record(NamedTuple):
    """A record before it is written.

    Its bytes up to the MSE, the size of its data, and what writes the data into its
    place in the payload (returning the MSE).
    """

    head: bytes
    data_len: int
    write: Callable[[np.ndarray], float]
    name: str
    info: Callable[..., TensorInfo]  # TensorInfo with all but ``mse`` and ``nbytes`` given


def _assemble(records: list[_Record], meta_raw: bytes) -> tuple[bytes, dict[str, TensorInfo]]:
    """Write the header, metadata, records and checksum into one preallocated payload.

    No record is copied more than once.
    """
    total = (
        HEADER.size
        + len(meta_raw)
        + sum(len(r.head) + MSE_LEN.size + r.data_len for r in records)
        + CRC.size
    )
    payload, buf = _new_payload(total)
    raw = buf.data  # the same storage, as a memoryview for struct
    HEADER.pack_into(raw, 0, MAGIC, VERSION, 0, total, len(records), len(meta_raw))
    pos = HEADER.size
    buf[pos : pos + len(meta_raw)] = np.frombuffer(meta_raw, np.uint8)
    pos += len(meta_raw)
    infos: dict[str, TensorInfo] = {}
    for r in records:
        buf[pos : pos + len(r.head)] = np.frombuffer(r.head, np.uint8)
        mse_at = pos + len(r.head)
        data_at = mse_at + MSE_LEN.size
        mse = r.write(buf[data_at : data_at + r.data_len])
        MSE_LEN.pack_into(raw, mse_at, mse, r.data_len)
        end = data_at + r.data_len
        infos[r.name] = r.info(mse=mse, nbytes=end - pos)
        pos = end
    CRC.pack_into(raw, pos, checksum(raw[:pos], VERSION))
    del buf, raw  # the views must not outlive this function (see _new_payload)
    return payload if isinstance(payload, bytes) else bytes(payload), infos


def _writer(data: bytes | np.ndarray, mse: float = 0.0) -> Callable[[np.ndarray], float]:
    """A record's ``write`` for data that is already at hand."""
    raw = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data.view(np.uint8)

    def write(out: np.ndarray) -> float:
        out[:] = raw.reshape(-1)
        return mse

    return write


def _encode_tensor(
    name: str,
    arr: np.ndarray,
    dtype: str,
    plan: TensorPlan,
    key: np.uint64,
    shared_key: int | None = None,
) -> _Record:
    if isinstance(arr, _OnDevice):
        if device_plan(plan):
            return _encode_on_device(name, arr, dtype, plan, key)
        arr = arr.host()
    if arr.dtype.kind == "f" and not plan.quantized:
        return _encode_raw_float(name, arr, dtype)
    shape = tuple(int(d) for d in arr.shape)
    if arr.dtype.kind in "biu":
        raw_dtype = DTYPES[_DTYPE_CODE[dtype]][1]
        assert raw_dtype is not None
        bits = 8 * raw_dtype.itemsize
        values = np.ascontiguousarray(np.ascontiguousarray(arr).astype(raw_dtype).reshape(-1))
        head = _record_head(name, _DTYPE_CODE[dtype], KIND_INT, bits, 0, 0, 0, shape)
        info = _raw_info(name, shape, dtype, bits)
        return _Record(head + _NO_SCALES_COUNT, values.nbytes, _writer(values), name, info)
    if arr.dtype.kind != "f":
        raise InvalidInputError(f"encode: tensor {name!r} has unsupported dtype {arr.dtype}")
    flat32 = np.ascontiguousarray(arr, dtype=np.float32)
    rows, gran = row_view(flat32, plan.granularity)
    transform, coding, block, min_block = TRANSFORM_NONE, CODING_PACKED, 0, 0
    sub = b""
    qrows = rows
    if plan.rotation:
        assert shared_key is not None  # checked by encode_with_stats
        tk = rotation.tensor_key(shared_key, name)
        block, min_block = rotation.DEFAULT_BLOCK, rotation.DEFAULT_MIN_BLOCK
        qrows = rotation.rotate(
            rows, tk.key, block=block, min_block=min_block, where=f"encode: tensor {name!r}"
        )
        transform = TRANSFORM_HADAMARD
        sub = _ROT_HEADER.pack(block.bit_length() - 1, min_block.bit_length() - 1, tk.check)
    scales = row_thresholds(qrows, plan.bits, plan.rounding, plan.method, plan.percentile)
    if transform:  # decoders refuse thresholds that could overflow once rotated back
        limit = rotation.scale_limit(qrows.shape[1], block)
        scales = np.minimum(scales, np.float32(limit))
    bits = plan.bits

    def quantize_into(out: np.ndarray | None) -> _Quantized:
        """Quantize into ``out`` (or a new buffer): the codes and the tensor's MSE."""
        q = quantize_rows(
            qrows,
            scales,
            bits,
            plan.rounding,
            key,
            values=flat32,
            where=f"encode: tensor {name!r}",
            out=out,
        )
        sq = q.sq_err
        if transform:  # the error on the padding is not the tensor's
            sq = max(
                0.0,
                sq
                - rotation.padding_error(
                    qrows, q.packed, bits, scales, rows.shape[1], block=block, min_block=min_block
                ),
            )
        return _Quantized(q.packed, sq / rows.size if rows.size else 0.0)

    ncodes = qrows.size
    data_len = len(sub) + packed_size(ncodes, bits)
    write: Callable[[np.ndarray], float]
    if plan.entropy is EntropyCoding.RANS:
        q = quantize_into(None)
        coded = entropy.encode_codes_if_smaller(unpack(q.packed, bits, ncodes), bits)
        if coded is not None:
            coding = CODING_RANS
            data_len = len(sub) + len(coded)
            write = _writer(sub + coded, q.mse)
        else:
            write = _writer(sub + q.packed.tobytes(), q.mse)
    else:

        def write(out: np.ndarray) -> float:
            out[: len(sub)] = np.frombuffer(sub, np.uint8)
            return quantize_into(out[len(sub) :]).mse

    head = _record_head(
        name, _DTYPE_CODE[dtype], KIND_QUANT, bits, _GRAN[gran], transform, coding, shape
    )
    head += _scales_bytes(scales)
    info = functools.partial(
        TensorInfo,
        name=name,
        shape=shape,
        dtype=dtype,
        bits=bits,
        granularity=gran,
        scales=scales,
        transform=transform,
        coding=coding,
        block=block,
        codes=ncodes,
    )
    return _Record(head, data_len, write, name, info)


class _Quantized(NamedTuple):
    """A quantized tensor's packed codes and its MSE."""

    packed: np.ndarray
    mse: float


def _scales_bytes(scales: np.ndarray) -> bytes:
    """A quantized record's scale count and scales."""
    return U32.pack(scales.size) + np.ascontiguousarray(scales, dtype="<f4").tobytes()


def device_plan(plan: TensorPlan) -> bool:
    """Whether a tensor on a GPU is quantized there under ``plan``.

    It is when the plan quantizes with the OCTAV threshold, no rotation and no entropy
    coding; otherwise it is copied to the host first.
    """
    return (
        plan.quantized
        and not plan.rotation
        and plan.entropy is EntropyCoding.NONE
        and plan.method in device.DEVICE_METHODS
    )


def _encode_on_device(
    name: str, arr: _OnDevice, dtype: str, plan: TensorPlan, key: np.uint64
) -> _Record:
    """The record of a tensor quantized on its device: only codes and scales cross."""
    t = arr.tensor.float()
    if plan.granularity is Granularity.CHANNEL and t.ndim >= 2 and t.shape[0] > 0:
        rows, gran = t.reshape(t.shape[0], -1), Granularity.CHANNEL
    else:
        rows, gran = t.reshape(1, -1), Granularity.TENSOR
    rows = rows.contiguous()
    where = f"encode: tensor {name!r}"
    scales = device.octav_thresholds(rows, plan.bits, plan.rounding, plan.method, where)
    q = device.quantize_on_device(rows, scales, plan.bits, plan.rounding, int(key))
    head = _record_head(
        name, _DTYPE_CODE[dtype], KIND_QUANT, plan.bits, _GRAN[gran], 0, 0, arr.shape
    )
    head += _scales_bytes(scales)
    info = functools.partial(
        TensorInfo,
        name=name,
        shape=arr.shape,
        dtype=dtype,
        bits=plan.bits,
        granularity=gran,
        scales=scales,
        codes=int(rows.numel()),
    )
    return _Record(head, q.packed.size, _writer(q.packed, q.mse), name, info)


def _copy_checked(flat: np.ndarray, out: np.ndarray) -> int:
    """Copy float32 ``flat`` into the bytes ``out`` (any alignment).

    Returns the number of NaN/Inf values, counted on the bit patterns in a read-only pass.
    """
    bad = int(kernels.count_nonfinite(flat.view(np.uint32))) if flat.size else 0
    out[:] = flat.view(np.uint8)
    return bad


def _encode_raw_float(name: str, arr: np.ndarray, dtype: str) -> _Record:
    """The record of a floating tensor that travels raw as float32 (biases, BatchNorm).

    It is copied into the payload and checked for NaN/Inf in one pass.
    """
    flat = np.ascontiguousarray(arr, dtype="<f4").reshape(-1)
    shape = tuple(int(d) for d in arr.shape)

    def write(out: np.ndarray) -> float:
        bad = _copy_checked(flat, out)
        if bad:
            raise NonFiniteError(
                f"encode: tensor {name!r}: input holds {bad} NaN/Inf value(s); "
                "expected finite values"
            )
        return 0.0

    head = _record_head(name, _DTYPE_CODE[dtype], KIND_FLOAT, FLOAT_BITS, 0, 0, 0, shape)
    info = _raw_info(name, shape, dtype, FLOAT_BITS)
    return _Record(head + _NO_SCALES_COUNT, flat.nbytes, write, name, info)


def _raw_info(
    name: str, shape: tuple[int, ...], dtype: str, bits: int
) -> Callable[..., TensorInfo]:
    """The info of a tensor that travels raw, once its MSE and size are known."""
    return functools.partial(
        TensorInfo,
        name=name,
        shape=shape,
        dtype=dtype,
        bits=bits,
        granularity=Granularity.TENSOR,
        scales=_NO_SCALES,
    )


@functools.lru_cache(maxsize=4096)
def _record_head(
    name: str,
    dcode: int,
    kind: int,
    bits: int,
    gcode: int,
    transform: int,
    coding: int,
    shape: tuple[int, ...],
) -> bytes:
    """A record's bytes up to its scales (the same for a tensor every round: cached)."""
    name_b = name.encode()
    return pack_head(
        len(name_b), name_b, (dcode, kind, bits, gcode, transform, coding, len(shape), 0), shape
    )


# --------------------------------------------------------------------------- decode


def peek_header(payload: bytes | bytearray | memoryview) -> Header:
    """Validate the fixed header only; returns its fields (:class:`~fedquant.quant.wire.Header`)."""
    n = len(payload)
    if n < HEADER.size + CRC.size:
        raise DecodeError(
            f"decode: payload truncated: {n} byte(s), a fedquant payload has at least "
            f"{HEADER.size + CRC.size}"
        )
    header = read_header(payload)
    if header.magic != MAGIC:
        raise DecodeError(
            f"decode: wrong magic {bytes(header.magic)!r}; expected {MAGIC!r} (not a fedquant "
            "payload)"
        )
    if header.version not in READ_VERSIONS:
        raise DecodeError(
            f"decode: unknown format version {header.version}; this fedquant reads versions "
            f"{', '.join(map(str, READ_VERSIONS))}"
        )
    if header.flags != 0:
        raise DecodeError(f"decode: header flags {header.flags:#x} are not supported; expected 0")
    if header.total_len != n:
        raise DecodeError(
            f"decode: inconsistent length: header says {header.total_len} bytes, payload has {n} "
            "(truncated or padded)"
        )
    return header


def describe_payload(
    payload: bytes | bytearray | memoryview, *, shared_key: int | None = None
) -> DecodedUpdate:
    """Validate a payload like :func:`decode` but skip dequantization.

    The result's ``tensors`` is empty; ``info`` and ``meta`` are filled. The
    server uses it to read every client's per-tensor MSE before decoding
    (:func:`decode_inspected` then produces the values without a second parse).
    Rotated tensors need no key here; given ``shared_key``, their key check is
    verified as :func:`decode` does.
    """
    return _decode(payload, values=False, shared_key=shared_key)


def decode(
    payload: bytes | bytearray | memoryview, *, shared_key: int | None = None
) -> DecodedUpdate:
    """Decode a payload made by :func:`encode`.

    Parameters
    ----------
    payload : bytes, bytearray or memoryview
    shared_key : int, optional
        The key the sender passed to :func:`encode`; needed only if the payload
        holds rotated tensors (``transform = 1``), which cannot be decoded
        without it.

    Returns
    -------
    DecodedUpdate
        ``tensors``: float32 arrays for floating tensors (quantized ones
        dequantized), the original integer dtype for integer tensors.

    Raises
    ------
    DecodeError
        For every kind of malformed input: truncated, corrupted (checksum),
        wrong magic, unknown version, inconsistent lengths, out-of-range
        fields, non-finite scales or MSE, absurd shapes, entropy-coded data that
        does not decode to exactly the tensor's codes, and rotated tensors
        without ``shared_key`` or made with another key.
    InvalidInputError
        ``shared_key`` is not an int in ``[0, 2**64)``.
    """
    return _decode(payload, values=True, shared_key=shared_key)


def _decode(
    payload: bytes | bytearray | memoryview, *, values: bool, shared_key: int | None = None
) -> DecodedUpdate:
    if shared_key is not None:
        shared_key = rotation.check_shared_key(shared_key, "decode")
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise DecodeError(f"decode: expected bytes, got {type(payload).__name__}")
    try:
        # cast a view to bytes; copy one that is not contiguous (a strided slice)
        buf = (
            (payload.cast("B") if payload.c_contiguous else memoryview(payload.tobytes()))
            if isinstance(payload, memoryview)
            else memoryview(payload)
        )
    except ValueError as e:  # a released memoryview
        raise DecodeError(f"decode: unusable memoryview: {e}") from None
    header = peek_header(buf)
    version, total, count = header.version, header.total_len, header.n_tensors
    (stored_crc,) = CRC.unpack_from(buf, total - CRC.size)
    if checksum(buf[: total - CRC.size], version) != stored_crc:
        raise DecodeError("decode: checksum mismatch: the payload is corrupted")
    meta_len = header.meta_len
    reader = Cursor(buf, HEADER.size, total - CRC.size)
    meta = _decode_meta(
        reader.take(meta_len, "metadata") if meta_len <= MAX_META else None, meta_len
    )
    left = reader.left
    if count > left // _MIN_RECORD:
        raise DecodeError(
            f"decode: header claims {count} tensors but only {left} bytes of records follow"
        )
    tensors: dict[str, np.ndarray] = {}
    infos: dict[str, TensorInfo] = {}
    records: list[_Data] = []
    checks = _Checks()
    for i in range(count):
        arr, info, rec = _decode_record(reader, i, checks, values, shared_key)
        name = info.name
        if name in infos:
            raise DecodeError(f"decode: tensor name {name!r} appears twice")
        if arr is not None:
            tensors[name] = arr
        infos[name] = info
        records.append(rec)
    if reader.pos != reader.end:
        raise DecodeError(
            f"decode: inconsistent length: {reader.end - reader.pos} unexplained byte(s) after "
            f"the last of {count} tensors"
        )
    source = None if values else _Source(buf, stored_crc, version, tuple(records))
    return DecodedUpdate(tensors=tensors, info=infos, meta=meta, nbytes=total, _source=source)


def decode_inspected(update: DecodedUpdate, *, shared_key: int | None = None) -> DecodedUpdate:
    """The values of an update :func:`describe_payload` returned, without parsing its payload again.

    The result equals ``decode(payload, shared_key=shared_key)`` of the
    inspected payload. The server inspects every reply when it admits it; this
    spares it a second parse of every record (and of every length and range
    check) when it aggregates. The payload's checksum is verified again, so a
    buffer changed since it was inspected raises :class:`DecodeError` instead
    of yielding other values.

    Raises
    ------
    InvalidInputError
        ``update`` did not come from :func:`describe_payload`; ``shared_key`` is not an
        int in ``[0, 2**64)``.
    DecodeError
        The payload changed since it was inspected; a rotated tensor and no
        ``shared_key`` (or another key than the sender's).
    """
    src = update._source
    if src is None:
        raise InvalidInputError(
            "decode_inspected: the update was not made by codec.describe_payload(); decode the payload "
            "with codec.decode() instead"
        )
    if shared_key is not None:
        shared_key = rotation.check_shared_key(shared_key, "decode")
    if checksum(src.buf[: len(src.buf) - CRC.size], src.version) != src.crc:
        raise DecodeError("decode: checksum mismatch: the payload changed after it was inspected")
    tensors = {
        name: _record_values(info, rec, shared_key)
        for (name, info), rec in zip(update.info.items(), src.data, strict=True)
    }
    return DecodedUpdate(tensors=tensors, info=update.info, meta=update.meta, nbytes=update.nbytes)


def _decode_meta(raw: memoryview | None, meta_len: int) -> dict[str, Any]:
    if raw is None:
        raise DecodeError(f"decode: metadata of {meta_len} bytes exceeds the {MAX_META}-byte limit")
    if not meta_len:
        return {}

    def no_constants(c: str) -> Any:
        raise ValueError(f"non-finite number {c}")

    def finite_float(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):  # e.g. 1e999 overflows to inf
            raise ValueError(f"non-finite number {text[:32]}")
        return value

    try:
        meta = json.loads(
            bytes(raw).decode("utf-8"), parse_constant=no_constants, parse_float=finite_float
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DecodeError(f"decode: metadata is not valid UTF-8 JSON: {e}") from None
    if not isinstance(meta, dict) or not all(
        isinstance(v, (str, int, float, bool)) or v is None for v in meta.values()
    ):
        raise DecodeError("decode: metadata must be a JSON object of scalar values")
    return meta


class _Checks:
    """The decoder's checks of each field of a record, made as the walker reads it.

    See :class:`fedquant.quant.wire.RecordCheck`; what the checks derive is kept for
    the record.
    """

    __slots__ = ("dtype", "gran", "numel", "raw_dtype", "scale_values", "tensor")

    def __init__(self) -> None:
        self.tensor = ""
        self.dtype = ""
        self.raw_dtype: np.dtype | None = None
        self.gran = Granularity.TENSOR
        self.numel = 0
        self.scale_values = _NO_SCALES

    def name_len(self, rec: Record, where: str) -> None:
        if not 1 <= rec.name_len <= MAX_NAME:
            raise DecodeError(
                f"decode: {where}: name length {rec.name_len} is not in 1..{MAX_NAME}"
            )

    def name(self, rec: Record, where: str) -> str:
        try:
            self.tensor = bytes(rec.name).decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError(f"decode: {where}: name is not valid UTF-8") from None
        return f"tensor {self.tensor!r}"

    def fixed(self, rec: Record, where: str) -> None:
        dcode, kind, bits, gcode, transform, coding, ndim, reserved = rec.fixed
        if dcode not in DTYPES:
            raise DecodeError(
                f"decode: {where}: unknown dtype code {dcode}; expected one of {sorted(DTYPES)}"
            )
        dtype, raw_dtype = DTYPES[dcode]
        floating = raw_dtype is None
        if kind not in (KIND_QUANT, KIND_FLOAT, KIND_INT) or (kind == KIND_INT) == floating:
            raise DecodeError(f"decode: {where}: kind {kind} is not valid for dtype {dtype}")
        if kind == KIND_QUANT and not 1 <= bits <= 8:
            raise DecodeError(
                f"decode: {where}: bits={bits} out of range; expected 1..8 for a quantized tensor"
            )
        if kind == KIND_FLOAT and bits != FLOAT_BITS:
            raise DecodeError(f"decode: {where}: bits={bits}; expected 32 for a raw float32 tensor")
        if kind == KIND_INT and raw_dtype is not None and bits != 8 * raw_dtype.itemsize:
            raise DecodeError(
                f"decode: {where}: bits={bits}; expected {8 * raw_dtype.itemsize} for {dtype}"
            )
        if gcode not in _GRAN_BACK or (kind != KIND_QUANT and gcode != 0):
            raise DecodeError(f"decode: {where}: granularity code {gcode} is not valid")
        if reserved != 0:
            raise DecodeError(f"decode: {where}: reserved byte is {reserved}; expected 0")
        if transform not in (TRANSFORM_NONE, TRANSFORM_HADAMARD):
            raise DecodeError(
                f"decode: {where}: transform={transform} is unknown; expected 0 (none) or "
                "1 (randomized Hadamard)"
            )
        if coding not in (CODING_PACKED, CODING_RANS):
            raise DecodeError(
                f"decode: {where}: coding={coding} is unknown; expected 0 (packed) or 1 (rANS)"
            )
        if (transform or coding) and kind != KIND_QUANT:
            raise DecodeError(
                f"decode: {where}: transform={transform}, coding={coding}: only quantized "
                "tensors are transformed or entropy-coded (expected 0)"
            )
        if ndim > MAX_NDIM:
            raise DecodeError(f"decode: {where}: ndim={ndim}; at most {MAX_NDIM}")
        self.dtype, self.raw_dtype, self.gran = dtype, raw_dtype, _GRAN_BACK[gcode]

    def dims(self, rec: Record, where: str) -> None:
        # zero-size tensors carry no data to bound their other dims: bound the product
        if math.prod(max(d, 1) for d in rec.dims) > MAX_DIM:
            raise DecodeError(f"decode: {where}: absurd shape {rec.dims}")
        self.numel = math.prod(rec.dims)

    def n_scales(self, rec: Record, where: str) -> None:
        shape = rec.dims
        if rec.fixed[1] == KIND_QUANT:
            if self.gran is Granularity.CHANNEL and (len(shape) < 2 or shape[0] == 0):
                raise DecodeError(
                    f"decode: {where}: per-channel scales need >= 2 dims, shape {shape}"
                )
            want = shape[0] if self.gran is Granularity.CHANNEL else 1
        else:
            want = 0
        if rec.n_scales != want:
            raise DecodeError(f"decode: {where}: {rec.n_scales} scale(s); expected {want}")

    def scales(self, rec: Record, where: str) -> None:
        self.scale_values = _NO_SCALES
        if rec.n_scales:
            scales = np.frombuffer(rec.scales, dtype="<f4").astype(np.float32)
            if not np.isfinite(scales).all() or (scales < 0).any():
                raise DecodeError(f"decode: {where}: scales must be finite and >= 0")
            self.scale_values = scales

    def data_len(self, rec: Record, where: str, left: int) -> None:
        if not math.isfinite(rec.mse) or rec.mse < 0:
            raise DecodeError(f"decode: {where}: mse={rec.mse!r}; expected a finite value >= 0")
        kind, bits, transform, coding = rec.fixed[1], rec.fixed[2], rec.fixed[4], rec.fixed[5]
        if transform or coding:
            if rec.data_len > left:
                raise DecodeError(
                    f"decode: {where}: data length {rec.data_len} but only {left} bytes remain"
                )
            return
        expected = data_size(kind, bits, self.numel)
        if rec.data_len != expected:
            raise DecodeError(
                f"decode: {where}: data length {rec.data_len} does not match shape {rec.dims} "
                f"at {bits} bits ({expected} bytes expected)"
            )
        if expected > left:
            raise DecodeError(
                f"decode: {where}: shape {rec.dims} needs {expected} data bytes but only "
                f"{left} remain"
            )


def _decode_record(
    cur: Cursor, index: int, checks: _Checks, values: bool, shared_key: int | None
) -> tuple[np.ndarray | None, TensorInfo, _Data]:
    """Read and check one record; its values (if asked for), info and data."""
    rec = read_record(cur, f"tensor #{index}", checks)
    where = f"tensor {checks.tensor!r}"
    _, kind, bits, _, transform, coding, _, _ = rec.fixed
    data = rec.data
    if kind == KIND_QUANT and not (transform or coding):
        spare = 8 * len(data) - checks.numel * bits
        if spare and data[-1] >> (8 - spare):
            raise DecodeError(f"decode: {where}: padding bits of the last byte are not zero")
    elif kind == KIND_FLOAT:
        if kernels.count_nonfinite(np.frombuffer(data, dtype="<u4")):
            raise DecodeError(f"decode: {where}: float32 data holds NaN/Inf")
    elif checks.dtype == "bool" and (np.frombuffer(data, dtype=np.uint8) > 1).any():
        raise DecodeError(f"decode: {where}: bool data holds values other than 0/1")
    info = TensorInfo(
        name=checks.tensor,
        shape=rec.dims,
        dtype=checks.dtype,
        bits=bits,
        granularity=checks.gran,
        scales=checks.scale_values,
        mse=rec.mse,
        nbytes=cur.pos - rec.start,
        transform=transform,
        coding=coding,
        codes=checks.numel if kind == KIND_QUANT else 0,
    )
    stored = _Data(data, kind, checks.raw_dtype)
    if transform or coding:
        ext = _decode_extended(data, info, values, shared_key)
        return ext.values, replace(info, block=ext.block, codes=ext.codes), stored
    return _record_values(info, stored, shared_key) if values else None, info, stored


def _record_values(info: TensorInfo, rec: _Data, shared_key: int | None) -> np.ndarray:
    """The values of a validated record (float32 for floating tensors)."""
    if info.transform or info.coding:
        ext = _decode_extended(rec.data, info, True, shared_key)
        assert ext.values is not None  # values=True: the values, or a DecodeError
        return ext.values
    if rec.kind == KIND_QUANT:
        raw = np.frombuffer(rec.data, dtype=np.uint8)
        return _dequantize(raw, info.shape, info.numel, info.bits, info.scales)
    if rec.kind == KIND_FLOAT:
        return np.frombuffer(rec.data, dtype="<f4").astype(np.float32).reshape(info.shape)
    raw_dtype = rec.raw_dtype
    assert raw_dtype is not None
    target = np.dtype(bool) if info.dtype == "bool" else raw_dtype.newbyteorder("=")
    return np.frombuffer(rec.data, dtype=raw_dtype).astype(target).reshape(info.shape)


class _Extended(NamedTuple):
    """A transformed or entropy-coded record's values (``None`` if not asked for)."""

    values: np.ndarray | None
    block: int
    codes: int


def _decode_extended(
    data: memoryview, info: TensorInfo, values: bool, shared_key: int | None
) -> _Extended:
    """The data of a quantized record with ``transform`` or ``coding`` set.

    The layout is in the module docstring; ``info``'s ``block`` and ``codes`` are not read.
    """
    where, name, shape, bits = f"tensor {info.name!r}", info.name, info.shape, info.bits
    gran, scales, transform, coding = info.granularity, info.scales, info.transform, info.coding
    numel = math.prod(shape)
    rows = shape[0] if gran is Granularity.CHANNEL else 1
    row_len = numel // rows
    padded, block, min_block, off = row_len, 0, 0, 0
    sign_key = 0
    if transform == TRANSFORM_HADAMARD:
        if len(data) < _ROT_HEADER.size:
            raise DecodeError(
                f"decode: {where}: rotation sub-header truncated: {len(data)} of "
                f"{_ROT_HEADER.size} bytes"
            )
        b_log2, m_log2, check = _ROT_HEADER.unpack_from(data, 0)
        if not m_log2 <= b_log2 <= rotation.MAX_BLOCK_LOG2:
            raise DecodeError(
                f"decode: {where}: rotation blocks 2**{b_log2} (min 2**{m_log2}) are not valid; "
                f"expected 0 <= min <= block <= {rotation.MAX_BLOCK_LOG2}"
            )
        block, min_block, off = 1 << b_log2, 1 << m_log2, _ROT_HEADER.size
        padded = rotation.padded_length(row_len, block, min_block)
        limit = rotation.scale_limit(padded, block)
        if scales.size and float(scales.max()) > limit:
            raise DecodeError(
                f"decode: {where}: scale {float(scales.max()):.6g} would overflow float32 once "
                f"rotated back (blocks of {rotation.largest_block(padded, block)}); at most "
                f"{limit:.6g}"
            )
        if shared_key is not None:
            tk = rotation.tensor_key(shared_key, name)
            if tk.check != check:
                raise DecodeError(
                    f"decode: {where}: was rotated with another shared key (key check "
                    f"{check:#010x}; this key gives {tk.check:#010x}); decode with the sender's "
                    "shared_key"
                )
            sign_key = tk.key
    # without the key the data is still validated in full, then refused
    keyless = transform == TRANSFORM_HADAMARD and shared_key is None and values
    if keyless:
        values = False
    codes = rows * padded
    body = data[off:]
    flat: np.ndarray | None = None
    if coding == CODING_PACKED:
        expected = packed_size(codes, bits)
        if len(body) != expected:
            raise DecodeError(
                f"decode: {where}: {len(body)} bytes of packed codes; {codes} codes at {bits} "
                f"bits need {expected}"
            )
        raw = np.frombuffer(body, dtype=np.uint8)
        spare = 8 * expected - codes * bits
        if spare and int(raw[-1]) >> (8 - spare):
            raise DecodeError(f"decode: {where}: padding bits of the last byte are not zero")
        if values:
            flat = _dequantize(raw, (codes,), codes, bits, scales)
    else:
        steps = 2.0 * scales.astype(np.float64) / num_steps(bits)
        flat = entropy.decode_codes(
            body, bits, codes, steps=steps, row_len=padded, values=values, where=where
        )
    if keyless:
        raise DecodeError(
            f"decode: {where}: is rotated (transform=1) and cannot be decoded without the "
            "shared key: pass decode(payload, shared_key=...) with the sender's key (it is "
            "never sent)"
        )
    if flat is None:
        return _Extended(None, block, codes)
    if transform == TRANSFORM_HADAMARD:
        try:
            flat = rotation.unrotate_into(
                flat.reshape(-1),
                sign_key,
                rows,
                row_len,
                block=block,
                min_block=min_block,
                where=f"decode: {where}",
            )
        except InvalidInputError as e:
            raise DecodeError(e.detail) from None
    return _Extended(flat.reshape(shape), block, codes)


def _dequantize(
    raw: np.ndarray, shape: tuple[int, ...], numel: int, bits: int, scales: np.ndarray
) -> np.ndarray:
    """:func:`dequantize_packed`, without its level table where that outweighs the tensor.

    The table holds ``2**bits`` levels per scale (12 bytes each while built), so
    per channel with rows shorter than ``2**bits`` it costs more than the values
    themselves: ~600 bytes per 5 payload bytes at 8 bits and one element per row.
    There the levels are computed per element instead, with the float64
    arithmetic of :func:`~fedquant.quant.quantizer.level_table` (so the values are
    identical), in at most 13 bytes per element.
    """
    rows = scales.size
    if rows <= 1 or numel == 0 or rows << bits <= numel:
        return dequantize_packed(raw, shape, bits, scales)
    steps = num_steps(bits)
    values = unpack(raw, bits, numel).astype(np.float64).reshape(rows, -1)
    values -= steps / 2.0
    values *= 2.0 * scales.astype(np.float64).reshape(-1, 1) / steps
    return values.astype(np.float32).reshape(shape)
