"""WebDataset tar format: a streaming sample reader that survives corrupt members, and a deterministic writer.

We read tars ourselves instead of through webdataset's iterators because the cursor needs the ordinal of every
sample in its shard, and a damaged header must cost one sample, not the rest of the shard; the files are
plain WebDataset shards, read and written by webdataset and img2dataset alike.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Callable, Iterator

BLOCK = 512
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's rule: the key ends at the first dot


def split_key(name: str) -> tuple[str, str] | None:
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def iter_samples(stream, on_issue: Callable[[str, str], None]) -> Iterator[tuple[int, str, dict]]:
    """Yield (ordinal, key, {ext: bytes}) for each group of consecutive members sharing a key.

    ``on_issue(reason, key)`` is called for a corrupt member header (the bytes up to the next valid header
    are skipped) and for a truncated shard (the sample being read is dropped and the shard ends).
    """
    tf = tarfile.open(fileobj=stream, mode="r|", ignore_zeros=True)  # ignore_zeros: resync after bad headers
    ordinal, key, files = 0, None, {}
    expected = 0
    try:
        for member in tf:
            if member.offset > expected:
                on_issue("corrupt_member", key or "?")  # bytes between members were not a valid header
            expected = member.offset_data + -(-member.size // BLOCK) * BLOCK
            if not member.isfile():
                continue
            parts = split_key(member.name)
            if parts is None:
                continue
            if parts[0] != key and key is not None:
                yield ordinal, key, files
                ordinal, files = ordinal + 1, {}
            key = parts[0]
            files[parts[1]] = tf.extractfile(member).read()
    except (tarfile.TarError, EOFError) as exc:
        on_issue("truncated_shard", f"{key or '?'} ({exc})")
        return  # the sample in progress may miss members: dropped
    if key is not None:
        yield ordinal, key, files


class TarWriter:
    """Writes samples as a WebDataset tar with fixed metadata, so that the same input gives the same bytes."""

    def __init__(self, fileobj):
        self._tf = tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.USTAR_FORMAT)
        self.samples = 0

    def write(self, key: str, files: dict[str, bytes]) -> None:
        if "." in key.rsplit("/", 1)[-1]:
            raise ValueError(f"sample key {key!r} must not contain a dot (the extension starts at the dot)")
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "unimo", "unimo"
            self._tf.addfile(info, io.BytesIO(data))
        self.samples += 1

    def close(self) -> None:
        self._tf.close()
