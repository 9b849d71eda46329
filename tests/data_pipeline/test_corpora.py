"""Several weighted corpora per modality: the mix, and the cursor's exact and elastic resume with two
corpora."""

import logging
from collections import Counter

import pytest

from data_pipeline import DataConfig, build_loader, merge_states
from data_pipeline.mix import Mixer, fresh_mix
from tests.data_pipeline.resume_checks import assert_resume_is_exact

GEOMETRY = dict(seq_len=16, image_size=16, patch_size=8)
SOURCES = ("text", "image", "pair")


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory):
    """Per modality a big corpus (8 shards) and a small one (4 shards), in two folders."""
    from data_pipeline import write_synthetic_dataset

    root = tmp_path_factory.mktemp("corpora")
    big = write_synthetic_dataset(str(root / "big"), n_pairs=80, n_text=40, n_images=80, n_eval=10,
                                  samples_per_shard=10, image_size=16, seed=3)
    small = write_synthetic_dataset(str(root / "small"), n_pairs=40, n_text=40, n_images=40, n_eval=10,
                                    samples_per_shard=10, image_size=16, seed=4)
    return {"big": big, "small": small}


def _cfg(data, weights=None, workers=2, buffer=8, sizes=(8, 4, 4), names=("big", "small")):
    weights = weights or {"big": 1.0, "small": 1.0}
    section = {src: {"batch_size": size, "corpora": [{"name": n, "urls": data[n][src], "weight": weights[n]}
                                                      for n in names]} for src, size in zip(SOURCES, sizes)}
    return DataConfig(**section, tokenizer=data["big"]["tokenizer"], num_workers=workers,
                      shuffle_buffer=buffer, seed=11)


def _take(loader, n):
    """n batches as (per-source [(corpus, epoch, key)], per-batch tensors)."""
    seen, tensors = {s: [] for s in SOURCES}, []
    for i, batch in enumerate(loader):
        for s in SOURCES:
            seen[s] += list(zip(batch["corpus"][s], batch[s]["epoch"].tolist(), batch["keys"][s]))
        tensors.append({s: {k: v.clone() for k, v in batch[s].items()} for s in SOURCES})
        if i + 1 == n:
            break
    return seen, tensors


def _loaders(cfg, world, state=None):
    return [build_loader(cfg, rank=r, world_size=world, state=state, **GEOMETRY) for r in range(world)]


# -- the mix ------------------------------------------------------------------------------------------------

def test_the_mix_keeps_each_corpus_within_one_sample_of_its_share():
    weights = {"a": 5.0, "b": 3.0, "c": 2.0}
    mixer = Mixer(weights, fresh_mix(0, "pair", 2, 1, weights))
    picks = [mixer.pick() for _ in range(1000)]
    for n in (10, 37, 100, 1000):
        counts = Counter(picks[:n])
        for k, w in weights.items():
            assert abs(counts[k] - n * w / 10) <= 1.0, (n, k, counts)


def test_the_mix_is_deterministic_per_stream_and_resumes_from_its_snapshot():
    weights = {"a": 1.0, "b": 1.0, "c": 1.0}
    first = Mixer(weights, fresh_mix(7, "text", 4, 0, weights))
    head = [first.pick() for _ in range(11)]
    again = Mixer(weights, fresh_mix(7, "text", 4, 0, weights))
    assert [again.pick() for _ in range(11)] == head
    resumed = Mixer(weights, first.snapshot())
    assert [resumed.pick() for _ in range(50)] == [first.pick() for _ in range(50)]
    starts = {Mixer(weights, fresh_mix(7, "text", 4, i, weights)).pick() for i in range(4)}
    assert len(starts) > 1, "streams should not all start on the same corpus"


def test_batches_carry_the_configured_shares(two_corpora):
    loader = build_loader(_cfg(two_corpora, {"big": 3.0, "small": 1.0}, workers=0), rank=0, world_size=1,
                          **GEOMETRY)
    seen, _ = _take(loader, 10)
    for s in SOURCES:
        counts = Counter(c for c, _, _ in seen[s])
        n = 80 if s == "text" else 40
        assert counts == {f"{s}/big": n * 3 // 4, f"{s}/small": n // 4}, (s, counts)
    stats = loader.stats()
    assert stats["corpus/pair/big/samples"] == 30 and stats["corpus/pair/small/samples"] == 10
    # the small pair corpus (40 samples) was drawn from in epoch 0 only so far; an up-weighted one repeats
    assert stats["corpus/pair/small/epoch"] == 0


# -- resume -------------------------------------------------------------------------------------------------

@pytest.mark.integration  # DataLoader worker processes
def test_same_world_size_resume_with_two_corpora_is_exact(two_corpora):
    cfg = _cfg(two_corpora, {"big": 2.0, "small": 1.0})
    total, cut = 10, 5  # an odd cut: the resumed DataLoader must start with worker 1
    full = [_take(ld, total) for ld in _loaders(cfg, 2)]
    first = _loaders(cfg, 2)
    before = [_take(ld, cut) for ld in first]
    states = [ld.state_dict() for ld in first]
    after = [_take(ld, total - cut) for ld in _loaders(cfg, 2, state=states)]
    assert_resume_is_exact(before, after, full)


@pytest.fixture(scope="module")
def corpus_keys(two_corpora):
    """Every key of every corpus's epoch, from one uninterrupted single-stream run."""
    seen, _ = _take(build_loader(_cfg(two_corpora, workers=0, buffer=4), rank=0, world_size=1, **GEOMETRY),
                    120)
    out = {}
    for s in SOURCES:
        for name in ("big", "small"):
            per_epoch = [Counter(k for c, e, k in seen[s] if c == f"{s}/{name}" and e == ep)
                         for ep in range(2)]
            assert per_epoch[0] == per_epoch[1] and max(per_epoch[0].values()) == 1, (s, name)
            out[f"{s}/{name}"] = per_epoch[0]
    return out


def _check_exactly_once(seen_parts, corpus_keys, epochs=(0, 1), names=("big", "small")):
    for s in SOURCES:
        for name in names:
            corpus = f"{s}/{name}"
            for epoch in epochs:
                got = Counter(k for part in seen_parts for c, e, k in part[s] if c == corpus and e == epoch)
                want = corpus_keys[corpus]
                assert got == want, (corpus, epoch, got - want, want - got)


@pytest.mark.integration  # DataLoader worker processes
@pytest.mark.parametrize("world_before,world_after", [(2, 1), (1, 2)])
def test_other_world_size_sees_every_sample_of_each_corpus_epoch_once(two_corpora, corpus_keys, world_before,
                                                                      world_after):
    assert len(corpus_keys["pair/big"]) == 80 and len(corpus_keys["pair/small"]) == 40
    cfg = _cfg(two_corpora)
    first = _loaders(cfg, world_before)
    seen = [_take(ld, 16 // world_before)[0] for ld in first]
    states = [ld.state_dict() for ld in first]
    seen += [_take(ld, 120 // world_after)[0] for ld in _loaders(cfg, world_after, state=states)]
    _check_exactly_once(seen, corpus_keys)


@pytest.mark.integration  # DataLoader worker processes
def test_new_weights_on_resume_are_used_logged_and_recorded(two_corpora, corpus_keys, caplog):
    first = _loaders(_cfg(two_corpora), 2)
    seen = [_take(ld, 8)[0] for ld in first]
    states = [ld.state_dict() for ld in first]
    with caplog.at_level(logging.WARNING, logger="unimo.data"):
        resumed = _loaders(_cfg(two_corpora, {"big": 3.0, "small": 1.0}), 2, state=states)
    assert any("weights changed on resume" in r.getMessage() for r in caplog.records)
    after = [_take(ld, 60) for ld in resumed]
    for part, _ in after:
        counts = Counter(c for c, _, _ in part["image"])
        assert counts == {"image/big": 180, "image/small": 60}, counts
    history = merge_states([ld.state_dict() for ld in resumed])["mix"]["image"]["history"]
    assert [h["weights"] for h in history] == [{"image/big": 1.0, "image/small": 1.0},
                                               {"image/big": 3.0, "image/small": 1.0}]
    assert history[1]["from_picks"] == 2 * 8 * 4
    _check_exactly_once(seen + [p for p, _ in after], corpus_keys, epochs=(0,))


@pytest.mark.integration  # DataLoader worker processes
def test_a_removed_corpus_leaves_the_kept_one_to_continue(two_corpora, corpus_keys, caplog):
    first = _loaders(_cfg(two_corpora), 1)
    seen = [_take(ld, 10)[0] for ld in first]
    state = first[0].state_dict()
    with caplog.at_level(logging.WARNING, logger="unimo.data"):
        kept = _loaders(_cfg(two_corpora, names=("big",)), 1, state=state)
    assert any("removed ['pair/small']" in r.getMessage() for r in caplog.records)
    seen += [_take(ld, 50)[0] for ld in kept]  # items of epoch 0 may linger in the shuffle buffer
    for s in SOURCES:
        got = Counter(k for part in seen for c, e, k in part[s] if c == f"{s}/big" and e == 0)
        assert got == corpus_keys[f"{s}/big"], s  # epoch 0 of the kept corpus: each sample once, none lost


def test_an_added_corpus_starts_at_its_epoch_0_while_the_kept_one_continues(two_corpora, corpus_keys, caplog):
    """A one-corpus cursor resumed with a second corpus: the warning names both; the kept corpus's cursor is
    taken as saved and its epochs go on (each sample once, none lost or repeated); the added corpus reads from
    its epoch 0, in the very order of a run that had it from the start."""
    both = _cfg(two_corpora, workers=0, buffer=4)
    first = build_loader(_cfg(two_corpora, workers=0, buffer=4, names=("big",)), rank=0, world_size=1,
                         **GEOMETRY)
    before, _ = _take(first, 10)
    state = first.state_dict()
    with caplog.at_level(logging.WARNING, logger="unimo.data"):
        resumed = build_loader(both, rank=0, world_size=1, state=state, **GEOMETRY)
    messages = [r.getMessage() for r in caplog.records]
    for s in SOURCES:
        assert any(f"data.{s}: corpora changed on resume: kept ['{s}/big'] continue; added ['{s}/small'] "
                   f"start at epoch 0" in m for m in messages), (s, messages)
        kept = f"{s}/big"
        assert resumed.state_dict()["sources"][kept]["streams"] == state["sources"][kept]["streams"], s
    after, _ = _take(resumed, 60)
    fresh, _ = _take(build_loader(both, rank=0, world_size=1, **GEOMETRY), 60)
    for s in SOURCES:
        small, small_fresh = ([(e, k) for c, e, k in run[s] if c == f"{s}/small"] for run in (after, fresh))
        n = min(len(small), len(small_fresh))
        assert n > len(corpus_keys[f"{s}/small"]), (s, n)  # beyond the added corpus's first epoch
        assert small[0][0] == 0 and small[:n] == small_fresh[:n], s
    # the kept corpus went on: a restart would deliver its epoch 0 twice
    _check_exactly_once([before, after], corpus_keys, epochs=(0, 1), names=("big",))


def test_replacing_every_corpus_on_resume_fails_naming_both_lists(two_corpora):
    first = _loaders(_cfg(two_corpora, workers=0), 1)
    _take(first[0], 2)
    state = first[0].state_dict()
    renamed = _cfg(two_corpora, workers=0)
    for s in SOURCES:
        for c in getattr(renamed, s).corpora:
            c.name = "other_" + c.name
    with pytest.raises(ValueError, match=r"data.text: the data cursor was saved with corpora \['text/big', "
                                         r"'text/small'\], the config has \['text/other_big'"):
        build_loader(renamed, rank=0, world_size=1, state=state, **GEOMETRY)


# -- config -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pair,match", [
    ({"urls": "a/", "corpora": [{"name": "x", "urls": "b/"}]}, "either urls .* or corpora"),
    ({"corpora": [{"name": "x", "urls": "b/"}, {"name": "x", "urls": "c/"}]}, "unique"),
    ({"corpora": [{"name": "x", "urls": "b/", "weight": 0}]}, r"corpora\[x\].weight=0: must"),
    ({"corpora": [{"name": "a b", "urls": "b/"}]}, "corpora.name='a b': must"),
    ({"corpora": [{"name": "x", "urls": ""}]}, r"corpora\[x\].urls"),
])
def test_corpus_config_errors_name_the_field(pair, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(pair=pair)


def test_relative_corpus_paths_become_absolute_for_the_workers():
    from orchestrator.driver import with_absolute_paths
    from trainer.config import load_config

    cfg = load_config(None, ["data.pair.corpora=[{name: a, urls: rel/a/}, {name: b, urls: [s3://b/x/, "
                             "rel/b/]}]", "data.text.urls=rel/text/"])
    data = with_absolute_paths(cfg).data
    assert data.pair.corpora[0].urls.startswith("/") and data.pair.corpora[0].urls.endswith("/rel/a")
    assert data.pair.corpora[1].urls[0] == "s3://b/x/" and data.pair.corpora[1].urls[1].startswith("/")
    assert data.text.urls.startswith("/")


def test_a_cursor_from_before_corpora_still_resumes_exactly(local_data):
    """Cursors saved before corpora existed have no mix and a source per modality: the shorthand reads
    them."""
    from data_pipeline import SourceConfig

    def cfg():
        return DataConfig(pair=SourceConfig(local_data["pair"], 4), tokenizer=local_data["tokenizer"],
                          num_workers=0, shuffle_buffer=8, seed=2)

    full = _keys(build_loader(cfg(), rank=0, world_size=1, **GEOMETRY), 8)
    first = build_loader(cfg(), rank=0, world_size=1, **GEOMETRY)
    before = _keys(first, 3)
    old = first.state_dict()
    del old["mix"]
    assert set(old["sources"]) == {"pair"}
    assert before + _keys(build_loader(cfg(), rank=0, world_size=1, state=old, **GEOMETRY), 5) == full


def _keys(loader, n):
    out = []
    for i, batch in enumerate(loader):
        out += batch["keys"]["pair"]
        if i + 1 == n:
            break
    return out


# -- fewer shards than streams ------------------------------------------------------------------------------

def _pair_keys(loaders, steps):
    out = []
    for ld in loaders:
        for i, batch in enumerate(ld):
            out += list(zip(batch["pair"]["epoch"].tolist(), batch["keys"]["pair"]))
            if i + 1 == steps:
                break
    return out


@pytest.mark.parametrize("world_before,world_after", [(12, 12), (12, 3), (2, 12)])
def test_a_corpus_with_fewer_shards_than_streams_is_read_once_per_epoch(local_data,
                                                                        world_before, world_after):
    """8 shards read by 12 streams (12 ranks of one in-process worker each): every epoch is dealt to 8 of
    them, the next epoch goes on where it stopped; each epoch still delivers every sample once, across resumes
    too."""
    from data_pipeline import SourceConfig

    def loaders(world, state=None):
        cfg = DataConfig(pair=SourceConfig(local_data["pair"], 2), tokenizer=local_data["tokenizer"],
                         num_workers=0, shuffle_buffer=1, seed=4)
        return [build_loader(cfg, rank=r, world_size=world, state=state, **GEOMETRY) for r in range(world)]

    first = loaders(world_before)
    seen = _pair_keys(first, 60 // world_before)
    seen += _pair_keys(loaders(world_after, [ld.state_dict() for ld in first]), 240 // world_after)
    every = {k for _, k in seen}
    assert len(every) == 80
    for epoch in (0, 1, 2):
        got = Counter(k for e, k in seen if e == epoch)
        assert set(got) == every and max(got.values()) == 1, (epoch, len(got), max(got.values()))
