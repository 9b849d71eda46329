"""Shards over http(s) (Python's http.server on 127.0.0.1), and fsspec schemes whose package is missing."""

import gzip
import logging
import shutil
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from data_pipeline import DataConfig, SourceConfig, build_loader
from data_pipeline.storage_io import DataReadError, DataSourceError, RetryingReader, RetryPolicy, list_shards
from data_pipeline.webdataset_tar import iter_samples

# Integration tier: an HTTP server on 127.0.0.1.
pytestmark = pytest.mark.integration

HTML = b"<!DOCTYPE html><html><body><h1>Sign in</h1></body></html>\n" * 30


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _Ranges(_Quiet):
    """http.server's file handler plus single-range requests (``Range: bytes=a-`` or ``a-b``), as S3, nginx
    and the Hugging Face hub answer them; the first GET of a path listed in ``cut`` is cut off after 1000
    bytes."""

    cut: set = set()

    def send_head(self):
        rng = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not rng or not rng.startswith("bytes=") or self.command != "GET":
            return super().send_head()
        with open(path, "rb") as f:
            data = f.read()
        a, _, b = rng[6:].partition("-")
        start, end = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
        body = data[start:end + 1]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if self.path in _Ranges.cut:
            _Ranges.cut.discard(self.path)
            self.wfile.write(body[:1000])
            self.close_connection = True
            return None
        self.wfile.write(body)
        return None

    def end_headers(self):
        if not self.headers.get("Range"):
            self.send_header("Accept-Ranges", "bytes")
        super().end_headers()


@pytest.fixture(scope="module")
def site(local_data, tmp_path_factory):
    """gzip pair shards under /gz/, an HTML page among plain shards under /mixed/."""
    root = tmp_path_factory.mktemp("site")
    (root / "gz").mkdir()
    (root / "mixed").mkdir()
    for i, (url, _) in enumerate(list_shards(local_data["pair"])):
        name = url.rsplit("/", 1)[-1]
        with open(url, "rb") as src, gzip.open(root / "gz" / (name[:-4] + ".tar.gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        shutil.copy(url, root / "mixed" / name)
    (root / "mixed" / "shard-000002.tar").write_bytes(HTML)
    return root


def _serve(root, handler):
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module", params=["ranges", "no_ranges"])
def http_site(site, request):
    server, url = _serve(site, _Ranges if request.param == "ranges" else _Quiet)
    yield url
    server.shutdown()
    server.server_close()


def test_brace_pattern_and_folder_listing_with_sizes_from_the_server(http_site, site):
    pattern = list_shards(f"{http_site}/gz/shard-{{000000..000007}}.tar.gz")
    folder = list_shards(f"{http_site}/gz/")
    assert pattern == folder and len(folder) == 8
    for url, size in folder:
        assert size == (site / "gz" / url.rsplit("/", 1)[-1]).stat().st_size


def test_an_http_prefix_is_refused_asking_for_a_brace_pattern(http_site):
    with pytest.raises(DataSourceError, match=r"prefix cannot be listed; give the shards as a brace pattern"):
        list_shards(f"{http_site}/gz/shard-")
    with pytest.raises(DataSourceError,
                       match=r"2 of 10 shards do not exist, e.g. \['http.*shard-000008.tar.gz"):
        list_shards(f"{http_site}/gz/shard-{{000000..000009}}.tar.gz")


def test_gzip_shards_over_http_train(http_site, local_data):
    cfg = DataConfig(pair=SourceConfig(f"{http_site}/gz/", 8), tokenizer=local_data["tokenizer"],
                     num_workers=0, shuffle_buffer=1, read_block_bytes=4096)
    keys = set()
    for i, batch in enumerate(build_loader(cfg, rank=0, world_size=1, seq_len=16,
                                           image_size=16, patch_size=8)):
        keys.update(batch["keys"]["pair"])
        if i + 1 == 10:
            break
    assert len(keys) == 80  # one whole epoch of the 80 pairs


def test_a_reconnect_mid_shard_over_http_carries_on(site, local_data):
    server, base = _serve(site, _Ranges)
    try:
        url = f"{base}/gz/shard-000001.tar.gz"
        with RetryingReader(url, RetryPolicy(retries=1, backoff_s=0.0, backoff_max_s=0.0)) as plain:
            expected = [(o, k) for o, k, _ in iter_samples(plain, lambda *a: None)]
        _Ranges.cut.add("/gz/shard-000001.tar.gz")
        retries = []
        with RetryingReader(url, RetryPolicy(retries=2, backoff_s=0.0, backoff_max_s=0.0), block_bytes=4096,
                            on_retry=lambda: retries.append(1)) as reader:
            got = [(o, k) for o, k, _ in iter_samples(reader, lambda *a: None)]
        assert got == expected and len(got) == 10 and retries == [1]
    finally:
        server.shutdown()
        server.server_close()


def test_an_html_page_over_http_fails_inspect_naming_it(http_site, capsys):
    from data_pipeline.cli import main

    assert main(["inspect", f"{http_site}/mixed/"]) == 1
    assert f"{http_site}/mixed/shard-000002.tar: not_a_tar" in capsys.readouterr().err


def test_credentials_in_a_url_stay_out_of_errors(http_site):
    url = http_site.replace("http://", "http://someone:hunter2-secret@") + "/nothing/shard-{0..1}.tar"
    with pytest.raises(DataSourceError) as err:
        list_shards(url)
    assert "hunter2" not in str(err.value) and "***@127.0.0.1" in str(err.value)


class _FailsAfterTheStart(_Ranges):
    """Serves the first bytes of a file, then answers every range request further in with 500 (a storage
    outage in the middle of a shard)."""

    def send_head(self):
        rng = self.headers.get("Range") or ""
        if rng.startswith("bytes=") and not rng.startswith("bytes=0-"):
            self.send_error(500, "Internal Server Error")
            return None
        return super().send_head()


PASSWORD, SIGNATURE = "hunter2secret", "SIGsecret0123456789"


def _credentialed(base: str, path: str) -> str:
    """A URL as users paste them: a user:password@ and a presigned query string."""
    return (base.replace("http://", f"http://alice:{PASSWORD}@") + path
            + f"?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature={SIGNATURE}")


def _no_secret(text: str) -> bool:
    return PASSWORD not in text and SIGNATURE not in text and "AKIAEXAMPLE" not in text


def test_a_server_failing_mid_shard_logs_and_raises_no_credential(tmp_path, caplog):
    (tmp_path / "shard-000000.tar").write_bytes(bytes(range(256)) * 256)  # 64 KiB: many 4 KiB blocks
    server, base = _serve(tmp_path, _FailsAfterTheStart)
    try:
        url = _credentialed(base, "/shard-000000.tar")
        with caplog.at_level(logging.DEBUG, logger="unimo.data"):
            with pytest.raises(DataReadError) as err:
                with RetryingReader(url, RetryPolicy(retries=2, backoff_s=0.0, backoff_max_s=0.0),
                                    block_bytes=4096) as reader:
                    while reader.read(4096):
                        pass
    finally:
        server.shutdown()
        server.server_close()
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2 and "500" in retries[0]  # the cause is still told, without its secrets
    assert all(_no_secret(r.getMessage()) for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert _no_secret(str(err.value)) and "after 3 attempts" in str(err.value), str(err.value)
    assert "***@127.0.0.1" in str(err.value) and "shard-000000.tar?***" in str(err.value)


def test_a_missing_shard_at_a_credentialed_url_names_it_without_the_credential(http_site):
    with pytest.raises(DataSourceError) as err:
        RetryingReader(_credentialed(http_site, "/gz/shard-999999.tar.gz"), RetryPolicy(retries=0))
    assert _no_secret(str(err.value)), str(err.value)
    assert "***@127.0.0.1" in str(err.value) and "shard-999999.tar.gz" in str(err.value)


def test_a_missing_fsspec_implementation_names_the_package():
    try:
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs is installed here")
    except ImportError:
        pass
    with pytest.raises(DataSourceError,
                       match=r"gs://bucket/shards/: reading gs:// URLs needs the package gcsfs.*"
                             r"pip install gcsfs"):
        list_shards("gs://bucket/shards/")
    with pytest.raises(DataSourceError, match=r"no fsspec implementation reads 'nosuch://'"):
        list_shards("nosuch://bucket/shards/")


def test_a_dead_server_is_retried_then_a_read_error():
    server, base = _serve(".", _Quiet)
    server.shutdown()
    server.server_close()
    with pytest.raises((DataReadError, DataSourceError), match="127.0.0.1"):
        RetryingReader(f"{base}/x.tar", RetryPolicy(retries=1, backoff_s=0.0, backoff_max_s=0.0))
