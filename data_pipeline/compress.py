"""Compressed shards: gzip, bz2, xz (and zstd when ``zstandard`` is installed), recognised by their magic
bytes.

The decompressor reads from the shard's stream (a RetryingReader when reading storage), so a reconnect in the
middle of a shard resumes the compressed bytes where they stopped and the decompressor never notices. A shard
is read front to back either way; a resume skips the samples already yielded by their ordinals.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import zlib

from .storage_io import DataSourceError, safe_url

# Names a shard may have; the content decides how it is read, not the name.
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tzst")

_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))
_SNIFF = 6


class MissingDecompressor(DataSourceError):
    """The shard is compressed in a format whose package is not installed."""


class BadCompression(Exception):
    """The compressed stream is damaged (not merely cut short)."""


def is_shard_name(path: str) -> bool:
    return path.lower().endswith(SHARD_SUFFIXES)


def strip_suffix(name: str) -> str:
    """A shard's name without its tar/compression suffix (shard-000001.tar.gz -> shard-000001)."""
    lower = name.lower()
    for suffix in sorted(SHARD_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[:-len(suffix)]
    return name


def compression_of(head: bytes) -> str | None:
    return next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)


class _Prefixed:
    """The bytes already sniffed, then the rest of the stream."""

    def __init__(self, head: bytes, stream):
        self._head, self._stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._stream.read(n)
        if n is None or n < 0:
            out, self._head = self._head + self._stream.read(), b""
            return out
        out, self._head = self._head[:n], self._head[n:]
        return out if len(out) == n else out + self._stream.read(n - len(out))

    def readable(self) -> bool:
        return True


_DAMAGE = (OSError, zlib.error, lzma.LZMAError)


class _Decompressed:
    """A decompressing stream whose failures say what they mean for the shard: EOFError (the compressed data
    ends early) becomes the end of the stream, which the tar reader reports as a truncated shard; any other
    decoder error becomes BadCompression."""

    def __init__(self, inner, kind: str):
        self._inner, self.kind, self._ended = inner, kind, False

    @property
    def cut(self) -> bool:
        """The compressed data ended early. The tar reader cannot always tell: a cut before the first
        decompressed byte, or at a member's end, looks like a whole (or empty) tar."""
        return self._ended

    def read(self, n: int = -1) -> bytes:
        # read1 pieces, gathered here: a buffered read() that meets the early end would drop what it had read
        parts, have = [], 0
        while not self._ended and (n < 0 or have < n):
            piece = self._piece(1 << 20 if n < 0 else n - have)
            if not piece:
                break
            parts.append(piece)
            have += len(piece)
        return b"".join(parts)

    def _piece(self, n: int) -> bytes:
        try:
            return self._inner.read1(n)
        except EOFError:
            self._ended = True
            return b""
        except _DAMAGE as exc:
            if type(exc).__module__.split(".")[0] in ("botocore", "aiohttp", "s3fs", "fsspec"):
                raise  # a storage error that the retrying reader let through is not damage
            raise BadCompression(f"{self.kind}: {type(exc).__name__}: {exc}") from None
        except Exception as exc:
            if type(exc).__name__ == "ZstdError":
                raise BadCompression(f"zstd: {exc}") from None
            raise

    def readable(self) -> bool:
        return True


class _ZstdFrames:
    """Decompressed zstd frames one after another, as ``read1`` pieces, raising EOFError when the data ends
    inside a frame, as the gzip, bz2 and xz readers do: zstandard's own stream reader ends quietly there, so a
    cut zstd shard looked whole or empty."""

    _INPUT = 1 << 16

    def __init__(self, src, zstandard):
        self._src, self._dctx = src, zstandard.ZstdDecompressor()
        self._frame = None                  # the decompressor of the frame being read
        self._out, self._pos = b"", 0       # decompressed bytes not handed out yet

    def read1(self, n: int) -> bytes:
        while self._pos >= len(self._out):
            data = self._src.read(self._INPUT)
            if not data:
                if self._frame is not None and not self._frame.eof:
                    raise EOFError("zstd data ends inside a frame")
                return b""
            self._out, self._pos = self._decompress(data), 0
        out = self._out[self._pos:self._pos + n]
        self._pos += len(out)
        return out

    def _decompress(self, data: bytes) -> bytes:
        parts = []
        while data:
            if self._frame is None or self._frame.eof:
                self._frame = self._dctx.decompressobj()
            parts.append(self._frame.decompress(data))
            data = self._frame.unused_data if self._frame.eof else b""  # the next frame's start
        return b"".join(parts)


def decompressed(stream, url: str = "") -> tuple[object, str | None]:
    """(a stream of the tar bytes, the compression found or None) for a shard's raw stream."""
    head = b""
    while len(head) < _SNIFF:
        more = stream.read(_SNIFF - len(head))
        if not more:
            break
        head += more
    kind = compression_of(head)
    src = _Prefixed(head, stream)
    if kind is None:
        return src, None
    if kind == "gzip":
        return _Decompressed(gzip.GzipFile(fileobj=src, mode="rb"), kind), kind
    if kind == "bz2":
        return _Decompressed(bz2.BZ2File(src, "rb"), kind), kind
    if kind == "xz":
        return _Decompressed(lzma.LZMAFile(src, "rb"), kind), kind
    try:
        import zstandard
    except ImportError:
        what = safe_url(url) if url else "a shard"
        raise MissingDecompressor(f"{what} is zstd-compressed, and the zstandard package is not "
                                  "installed: pip install zstandard, or recompress the shards "
                                  "with gzip") from None
    return _Decompressed(_ZstdFrames(src, zstandard), kind), kind
