"""Bad shards and bad sources: skipped-and-counted samples, clear start-up errors (docs/RELIABILITY.md)."""

import io
import json
import logging
import tarfile

import pytest
from PIL import Image

from data_pipeline import DataConfig, DataSourceError, SourceConfig, build_loader
from data_pipeline.storage_io import list_shards, scrub_urls, storage_error
from data_pipeline.webdataset_tar import TarWriter

from .conftest import BUCKET

GEOMETRY = dict(seq_len=16, image_size=16, patch_size=8)


def _jpg(colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, format="JPEG")
    return buf.getvalue()


def _pair(i):
    return {"jpg": _jpg(), "txt": f"a red square number {i}".encode(), "json": json.dumps({"id": i}).encode()}


def _write(path, samples):
    with open(path, "wb") as f:
        w = TarWriter(f)
        for key, files in samples:
            w.write(key, files)
        w.close()


def _corrupt_header(path, member_name):
    """Overwrite the tar header of one member with garbage (its data blocks follow, unparseable)."""
    with tarfile.open(path) as tf:
        offset = tf.getmember(member_name).offset
    data = bytearray(path.read_bytes())
    data[offset:offset + 512] = bytes((i * 37 + 11) % 251 for i in range(512))
    path.write_bytes(bytes(data))


@pytest.fixture
def broken_pairs(tmp_path, local_data):
    """4 pair shards with one of each kind of damage; returns (urls, keys that must come out)."""
    root = tmp_path / "pairs"
    root.mkdir()
    good = []
    s0 = [(f"a{i}", _pair(i)) for i in range(5)]
    s0 += [("badimg", {"jpg": b"not an image at all", "txt": b"a caption"}),
           ("notext", {"jpg": _jpg()}), ("emptytext", {"jpg": _jpg(), "txt": b"   "}),
           ("badjson", {"jpg": _jpg(), "txt": b"fine caption", "json": b"{not json"})]
    _write(root / "shard-000000.tar", s0)
    good += [f"shard-000000/a{i}" for i in range(5)]
    _write(root / "shard-000001.tar", [(f"b{i}", _pair(i)) for i in range(6)])
    _corrupt_header(root / "shard-000001.tar", "b2.jpg")
    good += [f"shard-000001/b{i}" for i in range(6) if i != 2]
    _write(root / "shard-000002.tar", [(f"c{i}", _pair(i)) for i in range(6)])
    with tarfile.open(root / "shard-000002.tar") as tf:
        cut = tf.getmember("c3.jpg").offset_data + 100  # in the middle of c3's image
    (root / "shard-000002.tar").write_bytes((root / "shard-000002.tar").read_bytes()[:cut])
    good += [f"shard-000002/c{i}" for i in range(3)]
    huge = ("word " * 50_000).encode()
    _write(root / "shard-000003.tar", [(f"d{i}", _pair(i)) for i in range(4)] + [("huge", {"jpg": _jpg(),
                                                                                            "txt": huge})])
    good += [f"shard-000003/d{i}" for i in range(4)] + ["shard-000003/huge"]
    return str(root), good, local_data["tokenizer"]


def test_damaged_shards_are_counted_logged_and_skipped(broken_pairs, caplog):
    url, good, tokenizer = broken_pairs
    cfg = DataConfig(pair=SourceConfig(url, 2), tokenizer=tokenizer, num_workers=0, shuffle_buffer=2)
    loader = build_loader(cfg, rank=0, world_size=1, **GEOMETRY)
    seen = []
    with caplog.at_level(logging.WARNING, logger="unimo.data"):
        for i, batch in enumerate(loader):
            seen += [k for e, k in zip(batch["pair"]["epoch"].tolist(), batch["keys"]["pair"]) if e == 0]
            assert batch["pair"]["input_ids"].shape == (2, 16)  # the huge caption is truncated to seq_len
            if i == 30:
                break
    assert sorted(seen) == sorted(good)
    stats = loader.stats()
    assert stats["skipped_bad_image"] >= 1 and stats["skipped_missing_field"] >= 2
    assert stats["skipped_empty_text"] >= 1 and stats["skipped_corrupt_member"] >= 1
    assert stats["skipped_truncated_shard"] >= 1 and stats["skipped_bad_json"] >= 1
    assert any("shard-000000.tar" in r.message and "badimg" in r.message and "bad_image" in r.message
               for r in caplog.records)
    assert any("shard-000002.tar" in r.message and "truncated_shard" in r.message for r in caplog.records)


def test_empty_text_document_is_skipped(tmp_path, local_data):
    root = tmp_path / "text"
    root.mkdir()
    for s in range(2):
        _write(root / f"shard-00000{s}.tar", [("empty", {"txt": b""}), ("doc", {"txt": b"red circles " * 10}),
                                             ("nodoc", {"json": b"{}"})])
    cfg = DataConfig(text=SourceConfig(str(root), 2), tokenizer=local_data["tokenizer"], num_workers=0,
                     shuffle_buffer=1)
    loader = build_loader(cfg, rank=0, world_size=1, **GEOMETRY)
    next(iter(loader))
    assert loader.stats()["skipped_empty_text"] >= 1 and loader.stats()["skipped_missing_field"] >= 1


def test_a_source_with_no_usable_sample_stops_with_an_error(tmp_path, local_data):
    root = tmp_path / "bad"
    root.mkdir()
    _write(root / "shard-000000.tar", [("x", {"jpg": b"garbage", "txt": b"caption"})])
    cfg = DataConfig(pair=SourceConfig(str(root), 1), tokenizer=local_data["tokenizer"], num_workers=0)
    with pytest.raises(DataSourceError, match="no usable sample"):
        next(iter(build_loader(cfg, rank=0, world_size=1, **GEOMETRY)))


@pytest.mark.parametrize("make_url", [
    lambda tmp: str(tmp / "empty"),                                         # empty local folder
    lambda tmp: str(tmp / "missing-folder"),                                # no such folder
    lambda tmp: f"s3://{BUCKET}/no/such/prefix/",                           # empty prefix
    lambda tmp: "s3://no-such-bucket-unimo/pairs/",                         # missing bucket
    lambda tmp: f"s3://{BUCKET}/small/pairs/shard-{{000000..000099}}.tar",  # pattern naming absent shards
])
def test_unusable_shard_urls_fail_at_start_naming_the_url(tmp_path, s3_data, make_url, local_data):
    (tmp_path / "empty").mkdir()
    url = make_url(tmp_path)
    cfg = DataConfig(pair=SourceConfig(url, 2), tokenizer=local_data["tokenizer"])
    with pytest.raises(DataSourceError) as err:
        build_loader(cfg, rank=0, world_size=1, **GEOMETRY)
    assert url in str(err.value)


def test_missing_credentials_name_the_bucket_and_hide_secrets(s3_data, monkeypatch, tmp_path):
    import s3fs

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    s3fs.S3FileSystem.clear_instance_cache()  # a cached filesystem would still hold the keys
    try:
        with pytest.raises(DataSourceError) as err:
            list_shards(f"s3://{BUCKET}/small/pairs/")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    msg = str(err.value)
    assert BUCKET in msg and "AWS_ACCESS_KEY_ID" in msg and "credentials" in msg
    assert "testing-secret-value" not in msg and "testing-key-id" not in msg


def test_urls_inside_exception_texts_lose_user_info_and_query():
    text = ("500, message='Internal Server Error', url='https://alice:pw-secret1@host/x.tar?X-Amz-Signature="
            "sig0secret&a=b'; URL('http://bob:pw-secret2@h:80/y.tar?token=tok0secret') (see http://h/doc)")
    secrets = ("pw-secret1", "pw-secret2", "sig0secret", "tok0secret")
    out = scrub_urls(text)
    assert not any(s in out for s in secrets), out
    assert "url='https://***@host/x.tar?***'" in out and "URL('http://***@h:80/y.tar?***')" in out
    assert out.endswith("(see http://h/doc)")  # a URL without secrets is kept whole
    for exc in (RuntimeError(text), FileNotFoundError(text), ImportError(text)):
        msg = str(storage_error("https://alice:pw-secret1@host/x.tar?X-Amz-Signature=sig0secret", exc))
        assert not any(s in msg for s in secrets) and "https://***@host/x.tar?***" in msg, msg


@pytest.mark.parametrize("field,value",
                         [("num_workers", -1), ("shuffle_buffer", 0), ("mlm_probability", 1.5)])
def test_config_errors_name_the_field_and_value(field, value):
    with pytest.raises(ValueError, match=f"data.{field}={value}: must"):
        DataConfig(**{field: value})
    with pytest.raises(ValueError, match="batch_size"):
        SourceConfig("x", batch_size=0)
