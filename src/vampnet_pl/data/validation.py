"""Per-sample decoding and integrity checks, pure functions: nothing damaged reaches a model.

Prep writes ``codes_crc32`` (the standard CRC-32 of zlib and gzip, an int, of the codes array's bytes:
all codebooks, little-endian uint16, C order) into every sample's JSON. The reader checks dtype and
shape, the codebook count and that checksum; prep range-checked every token against the codec's
codebook size before writing it, so a matching checksum stands for the range check too.

The CRC is computed by ISA-L (``isal``: carry-less-multiply SIMD, about 2x faster than XXH3 and 13x
faster than stdlib ``zlib.crc32`` here, the same value). Older shard sets are still read: those with
``codes_xxh3`` (vampnet-pl before the CRC) are checked against it; those with no checksum get every
token checked to lie in ``[0, codebook_size)``.
"""

from __future__ import annotations

import functools
import io
import math

import numpy as np
from numpy.lib import format as npy_format
import xxhash
from isal.isal_zlib import crc32

CHECKSUM_FIELD = "codes_crc32"
LEGACY_CHECKSUM_FIELD = "codes_xxh3"  # written by earlier versions: still checked

# Why a sample (or a whole shard) was skipped: the keys of the skip counts and of the ``data/skipped/<reason>`` metrics.
UNDECODABLE = "undecodable"  # the .npy or .json member does not parse, or is missing
BAD_ARRAY = "bad_array"  # not a 2-D uint16 array
CODEBOOKS = "codebook_count"  # other than its own metadata (or the index) says: a missing codebook
TOKEN_RANGE = "token_out_of_range"
CHECKSUM = "checksum_mismatch"
FRAMES = "frame_count_mismatch"  # frames differ from the metadata
UNREADABLE_SHARD = "unreadable_shard"  # missing, unreadable or truncated tar (counted once per failure)
REASONS = (UNDECODABLE, BAD_ARRAY, CODEBOOKS, TOKEN_RANGE, CHECKSUM, FRAMES, UNREADABLE_SHARD)


class SampleInvalid(ValueError):
    """A sample that must not reach the model; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


_NPY_MAGIC = b"\x93NUMPY"
_UINT16, _UINT16_LE = np.dtype(np.uint16), np.dtype("<u2")


@functools.lru_cache(maxsize=256)
def _npy_header(head: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of a .npy header, parsed by numpy once per distinct header."""
    stream = io.BytesIO(head)
    version = npy_format.read_magic(stream)
    read = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
    return read(stream)


def decode_npy(data: bytes) -> np.ndarray:
    """A ``.npy`` member's array as a read-only view of its bytes: ``np.load`` without its copy, and with
    the header parsed once per shape (samples of a shard set share a few shapes). ``ValueError`` when
    the bytes are not a whole ``.npy``; ``np.load`` (no pickles) for Fortran order or object dtypes."""
    if data[:6] != _NPY_MAGIC or len(data) < 10 or data[6] not in (1, 2, 3):
        raise ValueError("not a .npy array (bad magic string)")
    size_bytes = 2 if data[6] == 1 else 4
    offset = 8 + size_bytes + int.from_bytes(data[8 : 8 + size_bytes], "little")
    if len(data) < offset:
        raise ValueError(f"truncated .npy header ({len(data)} of {offset} bytes)")
    shape, fortran_order, dtype = _npy_header(bytes(data[:offset]))
    if fortran_order or dtype.hasobject:
        return np.load(io.BytesIO(data), allow_pickle=False)
    expected = math.prod(shape) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(f".npy data is {len(data) - offset} bytes, its header says {expected}")
    return np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)


def codes_checksum(codes: np.ndarray) -> int:
    """CRC-32 of the codes' bytes (little-endian uint16, C order), equal to ``zlib.crc32`` of them."""
    if codes.dtype == _UINT16_LE:
        try:  # a C-contiguous array (what decode_npy gives) is hashed in place
            return crc32(codes)
        except ValueError:  # not C-contiguous (a Fortran-order .npy, a view)
            pass
    return crc32(np.ascontiguousarray(codes, dtype=_UINT16_LE))


def legacy_codes_checksum(codes: np.ndarray) -> str:
    """The ``codes_xxh3`` of earlier shard sets: XXH3-64 of the same bytes, hex."""
    return xxhash.xxh3_64_hexdigest(np.ascontiguousarray(codes, dtype=_UINT16_LE))


def validate_codes(codes: np.ndarray, meta: dict, codebook_size: int | None = None,
                   expected_codebooks: int | None = None) -> None:
    """Raise :class:`SampleInvalid` unless ``codes`` is a whole, undamaged sample.

    ``expected_codebooks``: the shard set's codebook count (from ``index.json``); the sample's own
    ``n_codebooks`` metadata takes precedence. ``codebook_size``: tokens must be below it.
    """
    shape = codes.shape  # this runs for every streamed sample: each attribute read once
    if len(shape) != 2 or codes.dtype != _UINT16:
        raise SampleInvalid(BAD_ARRAY, f"codes {codes.dtype}{list(shape)}, expected uint16[codebooks, frames]")
    expected = meta.get("n_codebooks", expected_codebooks)
    if expected is not None and shape[0] != expected:
        raise SampleInvalid(CODEBOOKS, f"{shape[0]} codebooks, its metadata says {expected}")
    frames = meta.get("frames")
    if frames is not None and shape[1] != frames:
        raise SampleInvalid(FRAMES, f"{shape[1]} frames, its metadata says {frames}")
    # A matching checksum: byte-identical to what prep wrote, and prep range-checked the codes before writing
    # it (the codec, hence its codebook size, is pinned by the fingerprint check): no range pass needed.
    written = meta.get(CHECKSUM_FIELD)
    if written is not None:
        if (found := codes_checksum(codes)) != written:
            raise SampleInvalid(CHECKSUM, f"codes CRC-32 {found:#010x}, written {written!r}")
        return
    if LEGACY_CHECKSUM_FIELD in meta:
        if (found := legacy_codes_checksum(codes)) != meta[LEGACY_CHECKSUM_FIELD]:
            raise SampleInvalid(CHECKSUM, f"codes XXH3 {found}, written {meta[LEGACY_CHECKSUM_FIELD]!r}")
        return
    if codebook_size is not None and codes.size and int(codes.max()) >= codebook_size:  # uint16: never below 0
        raise SampleInvalid(TOKEN_RANGE, f"token {int(codes.max())} outside [0, {codebook_size})")
