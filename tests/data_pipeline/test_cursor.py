"""The data cursor: exact resume at the same world size, exactly-once at another, from S3 with 2 workers."""

from collections import Counter

import pytest

from data_pipeline import DataConfig, SourceConfig, build_loader
from tests.data_pipeline.resume_checks import assert_resume_is_exact

GEOMETRY = dict(seq_len=16, image_size=16, patch_size=8)
SOURCES = ("text", "image", "pair")


def _cfg(urls, workers=2, buffer=8, sizes=(6, 3, 3)):
    return DataConfig(text=SourceConfig(urls["text"], sizes[0]), image=SourceConfig(urls["image"], sizes[1]),
                      pair=SourceConfig(urls["pair"], sizes[2]), tokenizer=urls["tokenizer"],
                      num_workers=workers, shuffle_buffer=buffer, seed=11)


def _take(loader, n):
    """n batches as (per-source [(epoch, key)], per-source tensors to compare)."""
    seen, tensors = {s: [] for s in SOURCES}, []
    for i, batch in enumerate(loader):
        for s in SOURCES:
            seen[s] += list(zip(batch[s]["epoch"].tolist(), batch["keys"][s]))
        tensors.append({s: {k: v.clone() for k, v in batch[s].items()} for s in SOURCES})
        if i + 1 == n:
            break
    return seen, tensors


def _loaders(urls, world, state=None, workers=2, **kw):
    return [build_loader(_cfg(urls, workers, **kw), rank=r, world_size=world, state=state, **GEOMETRY)
            for r in range(world)]


def test_same_world_size_resume_is_exact(s3_data):
    total, cut = 10, 5  # an odd cut: the resumed DataLoader must start with worker 1, not 0
    full = [_take(ld, total) for ld in _loaders(s3_data, 2)]
    first = _loaders(s3_data, 2)
    before = [_take(ld, cut) for ld in first]
    states = [ld.state_dict() for ld in first]
    # rank 0 resumes from every rank's state (a list), rank 1 from its own only, as the trainer saves them
    resumed = [build_loader(_cfg(s3_data), rank=r, world_size=2, state=st, **GEOMETRY)
               for r, st in ((0, states), (1, states[1]))]
    after = [_take(ld, total - cut) for ld in resumed]
    assert_resume_is_exact(before, after, full)


@pytest.fixture(scope="module")
def all_keys(s3_data):
    """Every key of every source's epoch, from a long uninterrupted single-stream run."""
    seen, _ = _take(build_loader(_cfg(s3_data, workers=0, buffer=4), rank=0, world_size=1, **GEOMETRY), 90)
    out = {}
    for s in SOURCES:
        per_epoch = [Counter(k for e, k in seen[s] if e == ep) for ep in range(2)]
        assert per_epoch[0] == per_epoch[1] and max(per_epoch[0].values()) == 1
        out[s] = per_epoch[0]
    return out


@pytest.mark.parametrize("world_before,world_after", [(2, 1), (1, 2)])
def test_other_world_size_sees_every_sample_once(s3_data, all_keys, world_before, world_after):
    expected = all_keys
    assert len(expected["pair"]) == 80 and len(expected["image"]) == 80
    first = _loaders(s3_data, world_before)
    seen = [_take(ld, 16 // world_before)[0] for ld in first]
    states = [ld.state_dict() for ld in first]
    steps = 100 // world_after
    seen += [_take(ld, steps)[0] for ld in _loaders(s3_data, world_after, state=states)]
    for s in SOURCES:
        for epoch in (0, 1):
            got = Counter(k for part in seen for e, k in part[s] if e == epoch)
            assert got == expected[s], (s, epoch, got - expected[s], expected[s] - got)


class _ReadLog:
    """Counts the bytes each shard URL gives, in every process: the loader's workers are forked from this
    (single-threaded) test process here, so that they inherit the patch (a trainer starts them from a
    forkserver, which would not)."""

    def __init__(self, monkeypatch, path):
        import multiprocessing

        import data_pipeline.loader as loader_mod
        import data_pipeline.stream as stream_mod

        monkeypatch.setattr(loader_mod, "worker_start_context", lambda: multiprocessing.get_context("fork"))

        base, self.path = stream_mod.RetryingReader, path

        class Logged(base):
            def close(self):
                with open(path, "a") as f:
                    f.write(f"{self.url} {self.pos}\n")
                super().close()

        monkeypatch.setattr(stream_mod, "RetryingReader", Logged)

    def reads(self):
        out = Counter()
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                url, n = line.rsplit(" ", 1)
                out[url] += int(n)
        return out


def _shard_of(key):
    return key.split("/")[0]


@pytest.mark.parametrize("world_after", [1, 2])
def test_resume_rereads_only_open_shards(s3_data, all_keys, monkeypatch, tmp_path, world_after):
    """After the cut, no shard whose samples were all yielded is read again, and the shards that were open are
    read at most once more each. Batches of one keep both runs inside epoch 0, where a shard read twice would
    be a re-read rather than the next epoch."""
    log_before = _ReadLog(monkeypatch, tmp_path / "before")
    first = _loaders(s3_data, 2, sizes=(1, 1, 1), buffer=2)
    seen = [_take(ld, 24)[0] for ld in first]
    states = [ld.state_dict() for ld in first]
    opened_before = set(log_before.reads())
    log_after = _ReadLog(monkeypatch, tmp_path / "after")
    for ld in _loaders(s3_data, world_after, state=states, sizes=(1, 1, 1), buffer=2):
        _take(ld, 1)
    reread = {u: n for u, n in log_after.reads().items() if u in opened_before}
    sizes, n_finished = {}, 0
    for s in SOURCES:
        yielded = Counter(_shard_of(k) for part in seen for _, k in part[s])
        total = Counter(_shard_of(k) for k in all_keys[s])
        finished = {sh for sh in total if yielded[sh] == total[sh]}
        n_finished += len(finished)
        for url in reread:
            if f"/{s}/" in url or f"/{s}s/" in url:
                assert url.rsplit("/", 1)[-1][:-4] not in finished, f"finished shard {url} was read again"
        from data_pipeline.storage_io import list_shards

        sizes.update(dict(list_shards(s3_data[s])))
    assert reread and n_finished >= 4, "the cut should fall after some finished and some open shards"
    for url, n in reread.items():
        assert n <= sizes[url], (url, n, sizes[url])


def test_the_merged_cursor_is_a_per_epoch_view_of_what_was_yielded(local_data):
    """Finished shards and partial shards' yielded ordinals account for exactly the samples handed out."""
    import json

    loaders = _loaders(local_data, 2, workers=0)
    seen = [_take(ld, 9)[0] for ld in loaders]
    from data_pipeline import merge_states

    merged = json.loads(json.dumps(merge_states([ld.state_dict() for ld in loaders])))
    view = merged["sources"]["pair"]
    yielded = Counter(k.split("/")[0] for part in seen for e, k in part["pair"] if e == 0)
    epoch0 = view["epochs"]["0"]
    per_shard = {f"shard-{s:06d}": 10 for s in epoch0["finished"]}
    for s, ranges in epoch0["partial"].items():
        per_shard[f"shard-{int(s):06d}"] = sum(b - a + 1 for a, b in ranges)
    assert per_shard == {k: v for k, v in yielded.items()}
    assert view["fresh_from"] == 1 and set(view["streams"]) == {"0", "1"}


def test_cursor_guards(local_data):
    loaders = _loaders(local_data, 2, workers=0)
    for ld in loaders:
        _take(ld, 2)
    states = [ld.state_dict() for ld in loaders]
    with pytest.raises(ValueError, match="every rank"):
        build_loader(_cfg(local_data, 0), rank=0, world_size=1, state=states[0], **GEOMETRY)
    cfg = _cfg(local_data, 0)
    cfg.seed = 12
    with pytest.raises(ValueError, match="data.seed = 12"):
        build_loader(cfg, rank=0, world_size=2, state=states, **GEOMETRY)
    with pytest.raises(ValueError, match="seq_len = 20"):
        build_loader(_cfg(local_data, 0), rank=0, world_size=2, state=states, seq_len=20, image_size=16,
                     patch_size=8)
    # each rank may also resume from its own state alone at the same world size (as the trainer saves them)
    assert _take(build_loader(_cfg(local_data, 0), rank=1, world_size=2, state=states[1], **GEOMETRY), 1)
