"""The sha256 of a file, read in blocks: catalog files and shards (prep). A fine-tune's ``init_from`` (training) is
hashed from the bytes it loads, to the same digest."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()
