"""Run storage that is a local (or shared) folder or an ``s3://bucket/prefix``: small files, listing, Ray's
filesystem.

Locations are plain strings: an absolute local path or an ``s3://`` URL. Local paths keep the behaviour they
always had (atomic rename for small files); S3 goes through fsspec/s3fs (endpoint and credentials from the
environment, as for data shards) and, for Ray Train, a pyarrow S3 filesystem built from the same environment;
every client and its retry policy is built in data_pipeline/filesystems.py. Nothing here takes a credential as
an argument, so none can end up in a config, a log or an error.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from urllib.parse import urlparse

from fsspec.callbacks import Callback

# endpoint_url and s3_client are used by callers of this module too (the pre-flight, the S3 run lock)
from data_pipeline.filesystems import (CREDENTIALS_HELP, endpoint_url, fsspec_filesystem,  # noqa: F401
                                       s3_client, upload_filesystem)


class StorageError(RuntimeError):
    """The run storage cannot be used (endpoint unreachable, bucket missing, no credentials)."""


class StorageUnreachable(OSError):
    """A request to remote run storage could not reach it (connection refused, reset or timed out) after the
    client's own retries. An OSError, like a local disk's failure: the callers that ride out an outage (the
    stop-file poll, the failure policy, retention after a save) catch OSError. botocore's connection errors,
    which s3fs lets through as they are, are no OSError: an S3 outage used to escape those guards (the fault
    campaign's S3 outage ended a job that way)."""


@contextlib.contextmanager
def _reaching(location: str):
    """Raises StorageUnreachable, naming the location, for a transport failure of a remote request."""
    try:
        yield
    except _transport_errors() as err:
        raise StorageUnreachable(f"cannot reach run storage for {location}: {err}") from err


def _transport_errors() -> tuple[type[BaseException], ...]:
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError, HTTPClientError
    except ImportError:  # no S3 client installed: nothing to translate
        return ()
    return BotoConnectionError, HTTPClientError


def is_remote(location: str | Path) -> bool:
    return "://" in str(location)


def join(base: str | Path, *parts: str) -> str:
    """``base/part/...`` without doubling slashes; keeps the ``s3://`` spelling (pathlib would eat one
    slash)."""
    out = str(base).rstrip("/")
    for part in parts:
        out += "/" + part.strip("/")
    return out


def name_of(location: str | Path) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def parent_of(location: str | Path) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[0]


def _fs(location: str):
    """(fsspec filesystem, path) of a location: s3fs's own retries, no listings cache (other writers change
    the run folder: Ray's upload, the driver, other ranks)."""
    return fsspec_filesystem(location, one_attempt=False, listings_cache=False)


# ----- small files (the run lock has its own conditional writes, see orchestrator/runlock.py) ---------------
def read_text(location: str | Path) -> str | None:
    """The file's text, or None if it does not exist."""
    if not is_remote(location):
        try:
            return Path(location).read_text()
        except FileNotFoundError:
            return None
    fs, path = _fs(str(location))
    try:
        with _reaching(str(location)), fs.open(path, "rb") as f:
            return f.read().decode()
    except FileNotFoundError:
        return None


def write_text(location: str | Path, text: str) -> None:
    """Replaces the file whole: a rename locally, one PUT on S3 (an object is never seen half-written)."""
    if not is_remote(location):
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return
    fs, path = _fs(str(location))
    with _reaching(str(location)):
        fs.pipe_file(path, text.encode())


def exists(location: str | Path) -> bool:
    if not is_remote(location):
        return Path(location).exists()
    fs, path = _fs(str(location))
    with _reaching(str(location)):
        return fs.exists(path)


def delete(location: str | Path) -> None:
    """Removes a file or a folder tree; a missing one is not an error."""
    if not is_remote(location):
        path = Path(location)
        if path.is_dir():
            import shutil

            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        return
    fs, path = _fs(str(location))
    try:
        with _reaching(str(location)):
            fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def move(src: str | Path, dst: str | Path) -> None:
    """Renames a folder tree: one rename locally; on S3 a server-side copy of every object, then a delete."""
    if not is_remote(src):
        os.replace(src, dst)
        return
    fs, path = _fs(str(src))
    target = _fs(str(dst))[1].rstrip("/")
    path = path.rstrip("/")
    with _reaching(str(src)):
        for key in fs.find(path):  # objects only: S3 has no folders to copy (s3fs's own mv tries and fails)
            fs.copy(key, target + key[len(path):])
        fs.rm(path, recursive=True)


def list_names(location: str | Path) -> list[str]:
    """Names directly under a folder or prefix (empty if it does not exist)."""
    if not is_remote(location):
        path = Path(location)
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    fs, path = _fs(str(location))
    try:
        with _reaching(str(location)):
            return sorted(name_of(p) for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def download(location: str, dest: Path, progress: bool | None = None) -> None:
    """Copies a remote folder tree into the local folder ``dest``.

    ``progress``: a bar of bytes downloaded, with the total and ETA, on stderr; None = when stderr is a
    terminal (never on Ray workers, whose output is a log).
    """
    from data_pipeline.progress import Progress

    fs, path = _fs(location)
    dest.mkdir(parents=True, exist_ok=True)
    src, to = path.rstrip("/") + "/", str(dest) + "/"
    bar = Progress(None, f"download {name_of(location)}", "B", enabled=progress, unit_scale=True)
    if not bar.shown:
        with _reaching(location):
            fs.get(src, to, recursive=True)
        return
    with bar, _reaching(location):
        bar.set_total(int(fs.du(path)))  # one listing, only when someone watches
        fs.get(src, to, recursive=True, callback=_ByteCallback(bar.update))


def download_file(location: str, dest: Path) -> None:
    """Copies one remote file to the local path ``dest`` (one GET; ranged GETs in parallel for a large
    one)."""
    fs, path = _fs(location)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _reaching(location):
        fs.get_file(path, str(dest))


def file_sizes(location: str) -> dict[str, int]:
    """{path relative to the folder: bytes} of every object under a remote folder (one listing, paged)."""
    fs, path = _fs(location)
    path = path.rstrip("/")
    with _reaching(location):
        found = fs.find(path, detail=True)
    return {key[len(path) + 1:]: int(info["size"]) for key, info in found.items()
            if info.get("type") != "directory" and key.startswith(path + "/")}


class _ByteCallback(Callback):
    """Counts the bytes of every file of a recursive get (fsspec hands each file a child callback)."""

    def __init__(self, tick, child: bool = False):
        super().__init__()
        self._tick, self._child = tick, child

    def branched(self, path_1, path_2, **kwargs):
        return _ByteCallback(self._tick, child=True)

    def relative_update(self, inc=1):
        if self._child:  # the parent counts files, not bytes
            self._tick(inc)


# ----- checks at start, and Ray Train's view of the storage -------------------------------------------------
def check_writable(location: str) -> None:
    """For ``s3://``: the endpoint answers, the credentials work and the bucket exists, else a StorageError
    that names the URL and what to set. Runs before any worker starts, so a typo costs seconds, not a cluster
    start."""
    if not is_remote(location):
        return
    if not location.startswith("s3://"):
        raise StorageError(f"run.storage {location}: only local paths and s3:// URLs are supported")
    bucket = urlparse(location).netloc
    endpoint = endpoint_url() or "AWS S3 (no AWS_ENDPOINT_URL set)"
    try:
        client = s3_client()
        client.head_bucket(Bucket=bucket)
    except Exception as err:  # noqa: BLE001 - every failure is reported the same way, with the URL
        code = str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))
        name = type(err).__name__
        if code in ("404", "NoSuchBucket"):
            raise StorageError(f"run.storage {location}: bucket '{bucket}' does not exist at {endpoint}; "
                               "create it first") from None
        if code in ("403", "AccessDenied") or "Credential" in name:
            raise StorageError(f"run.storage {location}: S3 refused access to bucket '{bucket}' at "
                               f"{endpoint}; {CREDENTIALS_HELP}") from None
        raise StorageError(f"run.storage {location}: cannot reach the S3 endpoint {endpoint} ({name}); set "
                           "AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) to a reachable S3 server, or unset it "
                           "for AWS itself") from None


def ray_storage(location: str, attempts: int = 10) -> tuple[str, object | None]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig: what checkpoints are uploaded through.

    A local path goes as it is. For ``s3://`` an explicit pyarrow S3FileSystem is built, because pyarrow 25
    does not read AWS_ENDPOINT_URL (checked: it resolves the bucket at *.amazonaws.com); keys stay in the
    environment, where pyarrow's default credential chain finds them on every worker. Each S3 request is tried
    ``attempts`` times (``checkpoint.upload_attempts``) with the AWS SDK's standard backoff.
    """
    if not is_remote(location):
        return location, None
    return upload_filesystem(location, attempts)


def url_of_ray_path(path: str, filesystem) -> str:
    """A Ray checkpoint's ``(path, filesystem)`` as one of our locations (``s3://`` URL or local path)."""
    import pyarrow.fs

    if isinstance(filesystem, pyarrow.fs.S3FileSystem):
        return "s3://" + path.lstrip("/")
    return path  # Ray's local filesystem (it wraps pyarrow's in its own class)
