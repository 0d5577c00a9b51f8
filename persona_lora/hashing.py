"""File hashes: sha256 (the manifest's base config hash, hub LFS files) and git's blob id (hub text files).

Both stream the file in 1 MiB chunks, so hashing a multi-GB shard costs no memory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20


def _digest(h, path: Path) -> str:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    return _digest(hashlib.sha256(), Path(path))


def git_blob_sha1(path: str | Path) -> str:
    """The id git (and the Hugging Face Hub) gives a non-LFS file: sha1 of "blob <size>\\0" + content."""
    path = Path(path)
    return _digest(hashlib.sha1(b"blob %d\0" % path.stat().st_size), path)
