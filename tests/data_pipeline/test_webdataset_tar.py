"""The tar reader against Python's tarfile: ustar, GNU and pax headers, corrupt and truncated shards."""

import io
import tarfile

import pytest

from data_pipeline.webdataset_tar import iter_members, iter_samples


def _tar(members, fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        tf.addfile(tarfile.TarInfo("some/dir/"))  # not a file: skipped
    return buf.getvalue()


def _samples(data: bytes):
    issues = []
    out = list(iter_samples(io.BytesIO(data), lambda reason, key: issues.append((reason, key))))
    return out, issues


LONG = "deep/" * 30 + "k\u00e9y-with-a-name-longer-than-one-hundred-bytes"
MEMBERS = [("a.jpg", b"\x01" * 700), ("a.txt", b"caption"), (f"{LONG}.jpg", b"x" * 512), (f"{LONG}.txt", b""),
           ("dir/" + "p" * 120 + "/b.json", b"{}")]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_members_match_tarfile(fmt):
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else [m for m in MEMBERS if LONG not in m[0]]
    data = _tar(members, fmt)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        expected = [(m.name, tf.extractfile(m).read()) for m in tf if m.isfile()]
    assert list(iter_members(io.BytesIO(data), lambda: pytest.fail("no corruption here"))) == expected


def test_samples_group_members_by_key():
    out, issues = _samples(_tar(MEMBERS))
    assert [(o, k, sorted(f)) for o, k, f in out] == [(0, "a", ["jpg", "txt"]), (1, LONG, ["jpg", "txt"]),
                                                      (2, "dir/" + "p" * 120 + "/b", ["json"])]
    assert not issues


def test_corrupt_header_costs_that_member_and_is_reported_once():
    data = bytearray(_tar([("a.txt", b"1"), ("b.jpg", b"\xff" * 2000), ("b.txt", b"2"), ("c.txt", b"3")]))
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tf:
        offset = tf.getmember("b.jpg").offset
    data[offset:offset + 512] = bytes((i * 37 + 11) % 251 for i in range(512))
    out, issues = _samples(bytes(data))
    assert [(k, sorted(f)) for _, k, f in out] == [("a", ["txt"]), ("b", ["txt"]), ("c", ["txt"])]
    assert issues == [("corrupt_member", "a")]


@pytest.mark.parametrize("cut", ["in_data", "in_header"])
def test_truncated_shard_drops_the_sample_being_read(cut):
    data = _tar([("a.txt", b"1"), ("a.jpg", b"j" * 600), ("b.txt", b"2"), ("b.jpg", b"k" * 900)])
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        member = tf.getmember("b.jpg")
    end = member.offset_data + 100 if cut == "in_data" else member.offset + 200
    out, issues = _samples(data[:end])
    assert [k for _, k, _ in out] == ["a"]
    assert [reason for reason, _ in issues] == ["truncated_shard"]


def test_concatenated_tars_and_empty_streams():
    out, issues = _samples(_tar([("a.txt", b"1")]) + _tar([("b.txt", b"2")]))
    assert [(o, k) for o, k, _ in out] == [(0, "a"), (1, "b")] and not issues
    assert _samples(b"") == ([], [])
