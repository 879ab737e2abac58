"""Per-sample integrity checks, pure functions: nothing damaged reaches a model.

Prep writes ``codes_xxh3`` (the 64-bit XXH3 hash, hex, of the codes array's bytes, all codebooks,
little-endian uint16, C order) into every sample's JSON. The reader checks dtype and shape, the codebook
count and that checksum; prep range-checked every token against the codec's codebook size before
writing it, so a matching checksum stands for the range check too. Shard sets written before the
checksum existed are still read, with every token checked to lie in ``[0, codebook_size)``.
"""

from __future__ import annotations

import numpy as np
import xxhash

CHECKSUM_FIELD = "codes_xxh3"

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


def codes_checksum(codes: np.ndarray) -> str:
    """XXH3-64 of the codes' bytes (little-endian uint16, C order), hex: ~5x cheaper than zlib's CRC-32 here,
    which keeps per-sample checking a small share of loader time (BENCHMARKS.md, Data integrity)."""
    return xxhash.xxh3_64_hexdigest(np.ascontiguousarray(codes, dtype="<u2"))


def validate_codes(codes: np.ndarray, meta: dict, codebook_size: int | None = None,
                   expected_codebooks: int | None = None) -> None:
    """Raise :class:`SampleInvalid` unless ``codes`` is a whole, undamaged sample.

    ``expected_codebooks``: the shard set's codebook count (from ``index.json``); the sample's own
    ``n_codebooks`` metadata takes precedence. ``codebook_size``: tokens must be below it.
    """
    if codes.ndim != 2 or codes.dtype != np.uint16:
        raise SampleInvalid(BAD_ARRAY, f"codes {codes.dtype}{list(codes.shape)}, expected uint16[codebooks, frames]")
    expected = meta.get("n_codebooks", expected_codebooks)
    if expected is not None and codes.shape[0] != expected:
        raise SampleInvalid(CODEBOOKS, f"{codes.shape[0]} codebooks, its metadata says {expected}")
    if "frames" in meta and codes.shape[1] != meta["frames"]:
        raise SampleInvalid(FRAMES, f"{codes.shape[1]} frames, its metadata says {meta['frames']}")
    if CHECKSUM_FIELD in meta:
        # Byte-identical to what prep wrote, and prep range-checked the codes before writing the checksum
        # (the codec, hence its codebook size, is pinned by the fingerprint check): no second pass needed.
        if codes_checksum(codes) != meta[CHECKSUM_FIELD]:
            raise SampleInvalid(CHECKSUM, f"codes XXH3 {codes_checksum(codes)}, written {meta[CHECKSUM_FIELD]}")
        return
    if codebook_size is not None and codes.size and int(codes.max()) >= codebook_size:  # uint16: never below 0
        raise SampleInvalid(TOKEN_RANGE, f"token {int(codes.max())} outside [0, {codebook_size})")
