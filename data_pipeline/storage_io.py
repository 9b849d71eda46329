"""Storage access through fsspec: shard listing, clear storage errors, and a shard reader that retries."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import time
from collections.abc import Callable

from braceexpand import braceexpand

from .errors import TransientError, UserError
from .filesystems import CREDENTIALS_HELP, fsspec_filesystem

log = logging.getLogger("unimo.data")

class DataSourceError(UserError):
    """A source cannot be used at all (empty listing, missing bucket, no credentials): the user's to fix."""


class DataReadError(TransientError):
    """A read kept failing after the retry budget; the run must stop rather than skip data (a restart may
    succeed once the storage is back)."""


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    retries: int = 8
    backoff_s: float = 0.5
    backoff_max_s: float = 20.0

    def delays(self):
        delay = self.backoff_s
        for _ in range(self.retries):
            yield delay
            delay = min(delay * 2, self.backoff_max_s)


_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
# A URL inside free text: its user-info (up to @) and its query string (up to a quote, a space or a closing
# bracket, as exception texts print URLs). Same rules as trainer.redaction.redact, which the data pipeline may
# not import (tests/test_layering.py).
_TEXT_USERINFO = re.compile(r"(\w+://)[^/@\s'\"]+@")
_TEXT_QUERY = re.compile(r"(\w+://[^\s?'\"]*)\?[^\s'\"\]\),>]+")


def safe_url(url) -> str:
    """A URL (or list of them) fit for logs, params and errors: no user:password@, no query string (presigned
    URLs carry their signature there)."""
    if isinstance(url, (list, tuple)):
        return "[" + ", ".join(safe_url(u) for u in url) + "]"
    url = _USERINFO.sub("***@", str(url))
    return url.split("?", 1)[0] + ("?***" if "?" in url else "")


def scrub_urls(text) -> str:
    """Text with every URL in it stripped as safe_url strips one: storage libraries put the URL they failed on
    into their messages (aiohttp: ``url='https://host/x.tar?X-Amz-Signature=...'``), so an exception's text
    must pass here before it reaches a log or an error."""
    return _TEXT_QUERY.sub(r"\1?***", _TEXT_USERINFO.sub(r"\1***@", str(text)))


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, fit for logs and errors (see scrub_urls)."""
    return f"{type(exc).__name__}: {scrub_urls(exc)}"


_default_policy = RetryPolicy()


def set_default_policy(policy: RetryPolicy) -> None:
    """The retries of storage calls made without an explicit policy in this process (tokenizer, listings).
    A training worker sets data.io_retries here, so that no call of the run retries longer than the config
    says; tools keep the built-in default."""
    global _default_policy
    _default_policy = policy


def default_policy() -> RetryPolicy:
    return _default_policy


def bucket_of(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0] if "://" in url else ""


def filesystem(url: str):
    """The fsspec filesystem for a URL (any scheme fsspec knows) and the path inside it."""
    try:
        fs, path = fsspec_filesystem(url, one_attempt=True)
    except ImportError as exc:
        raise DataSourceError(_missing_implementation(url, exc)) from None
    except ValueError as exc:
        if "protocol not known" not in str(exc).lower():
            raise
        raise DataSourceError(f"{safe_url(url)}: no fsspec implementation reads '{_scheme(url)}://' URLs; "
                              "check the scheme (file paths, s3://, http(s)://, gs://, "
                              "hf://, ...)") from None
    return fs, path


def _scheme(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def _missing_implementation(url: str, exc: ImportError) -> str:
    from fsspec.registry import known_implementations

    known = known_implementations.get(_scheme(url), {})
    package = known.get("class", "").split(".")[0] or "the fsspec implementation of this scheme"
    return (f"{safe_url(url)}: reading {_scheme(url)}:// URLs needs the package {package}, which is not "
            f"installed: pip install {package} ({scrub_urls(exc)})")


def storage_error(url: str, exc: BaseException) -> Exception:
    """Turn a storage exception into an error that names the URL (and never a secret)."""
    name = type(exc).__name__
    # Only object stores have buckets; an http(s) URL's host part may carry user:password@.
    bucket = "" if _is_http(url) else bucket_of(safe_url(url))
    url = safe_url(url)
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return DataSourceError(f"no usable S3 credentials for bucket '{bucket}' ({url}): {CREDENTIALS_HELP}")
    if isinstance(exc, PermissionError) or "AccessDenied" in str(exc) or "InvalidAccessKeyId" in str(exc) \
            or "SignatureDoesNotMatch" in str(exc):
        return DataSourceError(f"S3 refused access to bucket '{bucket}' ({url}): wrong credentials or no "
                               f"permission; {CREDENTIALS_HELP}")
    if isinstance(exc, FileNotFoundError):
        what = f"bucket '{bucket}' does not exist or" if bucket else "path"
        return DataSourceError(f"{url}: {what} not found")
    return DataSourceError(f"{url}: {describe(exc)}")


def list_shards(url: str, policy: RetryPolicy | None = None) -> list[tuple[str, int]]:
    """(url, size) of every shard of a source, sorted; raises DataSourceError naming the URL when empty.

    ``url`` is a brace pattern (every expanded shard must exist) or a prefix/folder whose ``.tar`` files are
    listed recursively. ``policy``: the retries of the listing (the run passes data.io_retries and its
    backoff, which bound every storage call; the default suits one-off tools).
    """
    if not url:
        raise DataSourceError("empty shard URL")
    try:
        shards = call_with_retries(lambda: _list_http(url) if _is_http(url) else _list_pattern(url)
                                   if "{" in url else _list_prefix(url), url, policy or default_policy())
    except (DataSourceError, DataReadError):
        raise
    except Exception as exc:  # noqa: BLE001 - anything else still names the URL
        raise storage_error(url, exc) from None
    if not shards:
        raise DataSourceError(f"no shards (*.tar, *.tar.gz, *.tgz, ...) found under {safe_url(url)}: point "
                              "it at a folder or prefix holding WebDataset shards, or a brace pattern "
                              "(`unimo data shards` writes them)")
    return shards


def _is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def _list_http(url: str) -> list[tuple[str, int]]:
    """Shards over http(s): a brace pattern, one shard, or a folder URL (ending in /) whose index page links
    them; sizes come from the server. A bare prefix cannot be listed over http."""
    from concurrent.futures import ThreadPoolExecutor

    from .compress import is_shard_name

    fs, _ = filesystem(url)
    hint = "give the shards as a brace pattern, e.g. .../shard-{000000..000099}.tar"
    if "{" in url:
        urls = sorted(set(braceexpand(url)))
    elif url.endswith("/"):
        urls = sorted({u for u in fs.ls(url, detail=False) if u.startswith(url)
                       and is_shard_name(u.split("?")[0])})
        if not urls:
            raise DataSourceError(f"{safe_url(url)}: the page links no shards (*.tar, *.tar.gz, ...); {hint}")
    elif is_shard_name(url.split("?")[0]):
        urls = [url]
    else:
        raise DataSourceError(f"{safe_url(url)}: an http(s) prefix cannot be listed; {hint}, or a folder URL "
                              f"ending in / whose index page links the shards")

    def size(u):
        try:
            return fs.info(u).get("size")
        except FileNotFoundError:
            return None

    with ThreadPoolExecutor(8) as pool:
        sizes = list(pool.map(size, urls))
    missing = [safe_url(u) for u, n in zip(urls, sizes) if n is None]
    if missing:
        raise DataSourceError(f"{safe_url(url)}: {len(missing)} of {len(urls)} shards do not exist, e.g. "
                              f"{missing[:3]}")
    return [(u, int(n)) for u, n in zip(urls, sizes)]


def _list_prefix(url: str) -> list[tuple[str, int]]:
    fs, path = filesystem(url)
    if fs.isfile(path):
        return [(url, fs.size(path))]
    found = fs.find(path, detail=True) if fs.isdir(path) else {}
    if not found:  # a key prefix such as s3://b/pairs/shard- rather than a folder
        found = {p: fs.info(p) for p in fs.glob(path.rstrip("/") + "*")}
    from .compress import is_shard_name  # .tar, .tar.gz, .tgz, ...

    return sorted((_with_scheme(url, p), int(info.get("size") or 0)) for p, info in found.items()
                  if is_shard_name(p) and info.get("type", "file") == "file")


def _list_pattern(url: str) -> list[tuple[str, int]]:
    urls = sorted(set(braceexpand(url)))
    sizes = {}
    fs, _ = filesystem(urls[0])
    for parent in sorted({u.rsplit("/", 1)[0] for u in urls}):  # one listing per folder, not per shard
        for entry in fs.ls(filesystem(parent)[1], detail=True):
            sizes[_norm(entry["name"])] = int(entry.get("size") or 0)
    missing = [u for u in urls if _norm(u) not in sizes]
    if missing:
        raise DataSourceError(f"{safe_url(url)}: {len(missing)} of {len(urls)} shards do not exist, e.g. "
                              f"{[safe_url(u) for u in missing[:3]]}")
    return [(u, sizes[_norm(u)]) for u in urls]


def _norm(url: str) -> str:
    return url.split("://", 1)[-1].lstrip("/")


def _with_scheme(like: str, path: str) -> str:
    """A listed path in the same spelling as the URL the user gave (s3://..., file://... or a plain path)."""
    if "://" in like:
        return f"{like.split('://', 1)[0]}://{path.lstrip('/') if like.startswith('s3://') else path}"
    return path


def shard_digest(urls: list[str]) -> str:
    """A short fingerprint of a shard list, so that a cursor is never applied to different data."""
    names = "\n".join(u.rsplit("/", 1)[-1] for u in urls)
    return hashlib.blake2b(names.encode(), digest_size=8).hexdigest()


_TRANSIENT_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "s3fs", "fsspec", "asyncio")


def _is_transient(exc: BaseException) -> bool:
    """Errors a later attempt may not see: network and server trouble, not missing objects, refused access,
    absent credentials or bugs."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError", "ParamValidationError"):
        return False
    if isinstance(exc, (OSError, TimeoutError, EOFError)):
        return True
    status = getattr(exc, "status", None)  # an HTTP error answer: 4xx (but timeouts and throttling) is final
    if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
        return False
    return type(exc).__module__.split(".")[0] in _TRANSIENT_MODULES


def call_with_retries(op: Callable, url: str, policy: RetryPolicy, *, on_failure=None, on_retry=None,
                      where: Callable[[], str] = lambda: ""):
    """op() retried with backoff on transient storage errors; permanent ones become errors naming the URL.

    After the budget a DataReadError: the run stops, never skips data (docs/RELIABILITY.md, 'S3 outage').
    """
    errors = []
    for delay in [*policy.delays(), None]:
        try:
            return op()
        except Exception as exc:
            if on_failure:
                on_failure()
            if not _is_transient(exc):
                if isinstance(exc, OSError) or type(exc).__name__.endswith("CredentialsError"):
                    raise storage_error(url, exc) from None
                raise
            errors.append(describe(exc))
            if delay is None:
                break
            log.warning("storage call for %s%s failed (%s); retrying in %.1fs", safe_url(url), where(),
                        errors[-1], delay)
            if on_retry:
                on_retry()
            time.sleep(delay)
    raise DataReadError(f"could not read {safe_url(url)}{where()} after {len(errors)} attempts: {errors[-1]}")


def _skip(f, n: int) -> None:
    while n > 0:
        got = len(f.read(min(n, 1 << 20)))
        if not got:
            raise EOFError(f"the stream ended {n} bytes before the position to resume from")
        n -= got


class RetryingReader:
    """A read-only stream over one shard that reopens at the byte already reached when a read fails.

    botocore retries a single request; a shard is read by many requests over minutes, so a storage outage in
    the middle needs a reopen at the current offset, with backoff, and after the budget a loud failure.
    """

    def __init__(self, url: str, policy: RetryPolicy, block_bytes: int = 8 << 20,
                 on_bytes: Callable[[int], None] | None = None, on_retry: Callable[[], None] | None = None):
        self.url, self.policy, self.block_bytes = url, policy, block_bytes
        self.pos = 0
        self._on_bytes, self._on_retry = on_bytes, on_retry
        self._f = None
        self._call(lambda: None)  # open now, so a missing shard fails here

    def _open(self):
        fs, path = filesystem(self.url)
        ranged = self.url.startswith("s3://") or _is_http(self.url)  # blocks of ranged GETs, read ahead
        kwargs = {"block_size": self.block_bytes, "cache_type": "readahead"} if ranged else {}
        f = fs.open(path, "rb", **kwargs)
        if self.pos:
            if getattr(f, "seekable", lambda: True)():
                f.seek(self.pos)
            else:  # an http server without range requests: read up to where we were
                _skip(f, self.pos)
        return f

    def _call(self, op):
        def attempt():
            if self._f is None:
                self._f = self._open()
            return op()

        return call_with_retries(attempt, self.url, self.policy, on_failure=self._close_quietly,
                                 on_retry=self._on_retry, where=lambda: f" at byte {self.pos}")

    def read(self, n: int = -1) -> bytes:
        data = self._call(lambda: self._f.read(n))
        self.pos += len(data)
        if self._on_bytes:
            self._on_bytes(len(data))
        return data

    def readable(self) -> bool:
        return True

    def _close_quietly(self):
        try:
            if self._f is not None:
                self._f.close()
        except Exception:  # noqa: BLE001 - the handle is broken anyway
            pass
        self._f = None

    def close(self):
        self._close_quietly()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
