"""Compressed shards (gzip, bz2, xz, and zstd: its package is a dev dependency) and files that are no tar."""

import bz2
import gzip
import io
import logging
import lzma
import shutil
import sys

import pytest
import torch

from data_pipeline import DataConfig, SourceConfig, build_loader
from data_pipeline.storage_io import DataSourceError, RetryingReader, RetryPolicy, list_shards
from data_pipeline.stream import SourceStream
from data_pipeline.webdataset_tar import iter_samples

GEOMETRY = dict(seq_len=16, image_size=16, patch_size=8)
HTML = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>gone</body></html>\n" * 20


def _shard_files(url_pattern):
    return [u for u, _ in list_shards(url_pattern)]


def _zstd(data: bytes) -> bytes:
    import zstandard  # in the dev extra: the zstd read path is tested, not skipped

    return zstandard.ZstdCompressor(write_checksum=True).compress(data)


def _compressed_pairs(local_data, root, compress, suffixes) -> str:
    """The pair shards of ``local_data`` compressed, named with the suffixes in turn, in their own folder."""
    for i, url in enumerate(_shard_files(local_data["pair"])):
        name = url.rsplit("/", 1)[-1].removesuffix(".tar") + suffixes[i % len(suffixes)]
        with open(url, "rb") as src:
            (root / name).write_bytes(compress(src.read()))
    return str(root)


@pytest.fixture(scope="module")
def gz_pairs(local_data, tmp_path_factory):
    """The pair shards of ``local_data`` gzipped, under .tar.gz and .tgz names, in their own folder."""
    return _compressed_pairs(local_data, tmp_path_factory.mktemp("gz"), gzip.compress, (".tar.gz", ".tgz"))


@pytest.fixture(scope="module")
def zst_pairs(local_data, tmp_path_factory):
    """The pair shards of ``local_data`` zstd-compressed, under .tar.zst and .tzst names."""
    return _compressed_pairs(local_data, tmp_path_factory.mktemp("zst"), _zstd, (".tar.zst", ".tzst"))


def _issues(data: bytes):
    issues = []
    out = list(iter_samples(io.BytesIO(data), lambda reason, key: issues.append(reason)))
    return out, issues


def _first_shard(local_data) -> bytes:
    with open(_shard_files(local_data["pair"])[0], "rb") as f:
        return f.read()


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress, _zstd],
                         ids=["gzip", "bz2", "xz", "zstd"])
def test_compressed_shards_read_like_plain_ones(local_data, compress):
    plain = _first_shard(local_data)
    assert _issues(compress(plain)) == _issues(plain) and len(_issues(plain)[0]) == 10


def test_zstd_without_its_package_names_the_url_and_the_compression(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)  # `import zstandard` now raises ImportError
    path = tmp_path / "shard-000000.tar.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(100))
    with RetryingReader(str(path), RetryPolicy()) as reader:
        with pytest.raises(DataSourceError, match=rf"{path}.*zstd.*pip install zstandard"):
            list(iter_samples(reader, lambda *a: None))


@pytest.mark.parametrize("compress", [gzip.compress, _zstd], ids=["gzip", "zstd"])
def test_cut_and_damaged_compressed_shards_are_counted_not_raised(local_data, compress):
    data = compress(_first_shard(local_data))
    for cut in (len(data) // 2, 40):  # inside the data; before the first decompressed byte
        out, issues = _issues(data[:cut])
        assert len(out) < 10 and issues == ["truncated_shard"], (cut, len(out), issues)
    damaged = bytearray(data)
    damaged[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    out, issues = _issues(bytes(damaged))
    assert len(out) < 10 and issues == ["bad_compression"]


def test_listing_finds_tar_gz_and_tgz(gz_pairs):
    names = [u.rsplit("/", 1)[-1] for u in _shard_files(gz_pairs)]
    assert len(names) == 8 and sum(n.endswith(".tgz") for n in names) == 4


def _pairs(urls, local_data, state=None):
    cfg = DataConfig(pair=SourceConfig(urls, 4), tokenizer=local_data["tokenizer"], num_workers=0,
                     shuffle_buffer=8, seed=5)
    return build_loader(cfg, rank=0, world_size=1, state=state, **GEOMETRY)


def _batches(loader, n):
    out = []
    for i, batch in enumerate(loader):
        out.append((batch["keys"]["pair"], {k: v.clone() for k, v in batch["pair"].items()}))
        if i + 1 == n:
            break
    return out


@pytest.mark.parametrize("folder", ["gz_pairs", "zst_pairs"])
def test_compressed_shards_train_and_resume_exactly(local_data, folder, request):
    shards = request.getfixturevalue(folder)
    full = _batches(_pairs(shards, local_data), 12)
    first = _pairs(shards, local_data)
    before = _batches(first, 5)
    after = _batches(_pairs(shards, local_data, state=first.state_dict()), 7)
    for (ka, ta), (kb, tb) in zip(before + after, full):
        assert ka == kb and all(torch.equal(ta[k], tb[k]) for k in ta)
    plain_keys = {k for keys, _ in _batches(_pairs(local_data["pair"], local_data), 20) for k in keys}
    assert {k for keys, _ in full for k in keys} <= plain_keys  # same samples, same keys


class _DropsOnce:
    """A file that fails once, with a connection reset, after ``limit`` bytes."""

    failed = False

    def __init__(self, f, limit):
        self._f, self._limit = f, limit

    def read(self, n=-1):
        if not _DropsOnce.failed and self._f.tell() >= self._limit:
            _DropsOnce.failed = True
            raise ConnectionResetError("connection reset by peer")
        return self._f.read(n if n >= 0 else -1)

    def seek(self, pos):
        return self._f.seek(pos)

    def close(self):
        self._f.close()


def test_a_reconnect_in_the_middle_of_a_gzip_shard_carries_on(local_data, tmp_path, monkeypatch):
    plain = _first_shard(local_data)
    path = tmp_path / "shard-000000.tar.gz"
    path.write_bytes(gzip.compress(plain))
    original = RetryingReader._open
    monkeypatch.setattr(RetryingReader, "_open", lambda self: _DropsOnce(original(self), len(plain) // 20))
    retries = []
    reader = RetryingReader(str(path), RetryPolicy(retries=2, backoff_s=0.0, backoff_max_s=0.0),
                            block_bytes=4096, on_retry=lambda: retries.append(1))
    with reader:
        out, issues = [], []
        for sample in iter_samples(_Small(reader), lambda reason, key: issues.append(reason)):
            out.append(sample)
    assert retries == [1] and not issues
    assert out == _issues(plain)[0]


class _Small:
    """Reads of 1 KiB at most, so the reset falls in the middle of the shard rather than in one big read."""

    def __init__(self, reader):
        self._r, self.url = reader, reader.url

    def read(self, n=-1):
        return self._r.read(min(n, 1024) if n >= 0 else 1024)


# -- not a tar ----------------------------------------------------------------------------------------------

def test_an_html_page_is_not_a_tar_not_a_truncated_shard():
    assert _issues(HTML) == ([], ["not_a_tar"])
    assert _issues(HTML[:100]) == ([], ["not_a_tar"])
    assert _issues(gzip.compress(HTML)) == ([], ["not_a_tar"])


@pytest.fixture
def pairs_with_a_page(local_data, tmp_path):
    """The pair shards with one of them replaced by an HTML page."""
    root = tmp_path / "pairs"
    root.mkdir()
    for url in _shard_files(local_data["pair"]):
        shutil.copy(url, root)
    (root / "shard-000003.tar").write_bytes(HTML)
    return root


def test_training_skips_and_counts_a_page_among_shards(local_data, pairs_with_a_page, caplog):
    loader = _pairs(str(pairs_with_a_page), local_data)
    with caplog.at_level(logging.WARNING, logger="unimo.data"):
        _batches(loader, 25)  # 100 samples: every shard opened
    assert loader.stats()["skipped_not_a_tar"] >= 1
    assert loader.stats()["corpus/pair/skipped_not_a_tar"] >= 1
    assert any("shard-000003.tar" in r.getMessage() and "not_a_tar" in r.getMessage() for r in caplog.records)


def test_a_corpus_with_no_readable_shard_stops_with_a_clear_error(local_data, tmp_path):
    root = tmp_path / "pages"
    root.mkdir()
    for i in range(2):
        (root / f"shard-{i:06d}.tar.gz").write_bytes(gzip.compress(HTML))
    with pytest.raises(DataSourceError,
                       match=r"source pair: no usable sample \(no readable shard\).*not_a_tar"):
        next(iter(_pairs(str(root), local_data)))


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_rank_stops_soon_on_a_corpus_of_bad_shards(local_data, tmp_path, monkeypatch, world_size):
    """Three bad shards (a page, a gzipped page, an empty file) for 1-4 ranks: each rank stops after a look
    at each shard or so, naming one of them."""
    root = tmp_path / "bad"
    root.mkdir()
    (root / "shard-000000.tar").write_bytes(HTML)
    (root / "shard-000001.tar.gz").write_bytes(gzip.compress(HTML))
    (root / "shard-000002.tar").write_bytes(b"")
    opened = []
    original = SourceStream._open
    monkeypatch.setattr(SourceStream, "_open",
                        lambda self, *a, **k: opened.append(1) or original(self, *a, **k))
    cfg = DataConfig(pair=SourceConfig(str(root), 4), tokenizer=local_data["tokenizer"], num_workers=0,
                     shuffle_buffer=8, seed=1)
    stop = (r"source pair: no usable sample \(no readable shard\): none of its 3 shards gave one "
            rf"\(e\.g\. {root}/")
    for rank in range(world_size):
        opened.clear()
        with pytest.raises(DataSourceError, match=stop + "shard-00000"):
            next(iter(build_loader(cfg, rank=rank, world_size=world_size, **GEOMETRY)))
        assert len(opened) <= 2 * 3  # its own shares of two plans, then one look at each other shard


def test_inspect_exits_non_zero_naming_the_page(pairs_with_a_page, capsys):
    from data_pipeline.cli import main

    assert main(["inspect", str(pairs_with_a_page)]) == 1
    captured = capsys.readouterr()
    assert f"{pairs_with_a_page}/shard-000003.tar: not_a_tar" in captured.err
    assert '"samples": 70' in captured.out


@pytest.fixture
def four_shards_one_page(local_data, tmp_path):
    """Four pair shards, the third of them an HTML page: fewer good shards than some worlds have ranks."""
    root = tmp_path / "four"
    root.mkdir()
    for url in _shard_files(local_data["pair"])[:4]:
        shutil.copy(url, root)
    (root / "shard-000002.tar").write_bytes(HTML)
    return str(root)


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_a_page_among_few_shards_never_stops_a_rank(local_data, four_shards_one_page, world_size):
    """A rank whose share is the page in several epochs in a row goes on: the corpus has readable shards."""
    per_epoch = 10 * -(-4 // world_size)  # samples a rank reads per epoch at most: its shards' worth
    for seed in range(6):
        cfg = DataConfig(pair=SourceConfig(four_shards_one_page, 4), tokenizer=local_data["tokenizer"],
                         num_workers=0, shuffle_buffer=8, seed=seed)
        for rank in range(world_size):
            loader = build_loader(cfg, rank=rank, world_size=world_size, **GEOMETRY)
            assert len(_batches(loader, 30)) == 30, f"seed {seed}, rank {rank} of {world_size}"
            stats = loader.stats()
            assert stats["corpus/pair/epoch"] >= 30 * 4 // per_epoch - 2  # many epochs (less the buffer's)
            assert stats["corpus/pair/skipped_not_a_tar"] >= 1
