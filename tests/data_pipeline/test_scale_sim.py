"""The scale simulation's smallest case: the real plan, cursor and mixer code at 8 -> 6 -> 8 ranks x 4 workers
over a synthetic listing (no tars, no processes), every sample of an epoch exactly once across the changes."""

import json

import pytest

from bench.scale_sim import (Drawn, build_world, drain_epoch, epoch_drawn_whole, run_steps, simulate,
                             synthetic_config, synthetic_listing)


def test_world_size_changes_keep_every_sample_exactly_once():
    cfg, listing = synthetic_config(buffer=8, batch=4), synthetic_listing(200)
    assert len(listing["pair/coco"]) < 8 * 4  # a corpus with fewer shards than streams is part of the case
    drawn = Drawn()  # refuses a sample key drawn twice
    rows = simulate([8, 6, 8], cfg, listing, steps=6, drawn=drawn, log=lambda line: None, measure=False)
    assert [r["world"] for r in rows] == [8, 6, 8]
    # Each save's cursor matched every sample drawn before it (simulate checks); from the last one, at 8
    # ranks, read on until epoch 0 is drawn whole: then every sample of the epoch came exactly once.
    drained = drain_epoch(cfg, listing, 8, rows[-1]["cursor"], drawn)
    total = sum(n for shards in listing.values() for _, n in shards)
    assert drained["epoch_samples"] == total and drained["drain_steps"] > 0
    assert sum(len(o) for (_, e, _), o in drawn.seen.items() if e == 0) == total


def test_a_drain_stops_only_at_the_epochs_end_and_names_a_missing_sample():
    """The completeness test counts: a sample drawn twice or a key outside the listing is refused at the draw,
    so the count reaching the epoch's samples is every sample once; one short is not the end."""
    listing = {"text": [("sim://text/shard-0.tar", 3)]}
    drawn = Drawn()
    for o in range(2):
        drawn.add("text", [0, 0, o], f"text/0/{o}")
    assert not epoch_drawn_whole(listing, drawn)
    drawn.add("text", [0, 0, 2], "text/0/2")
    assert epoch_drawn_whole(listing, drawn)
    with pytest.raises(AssertionError, match="drawn twice"):
        drawn.add("text", [0, 0, 2], "text/0/2")


def test_planned_share_deals_an_epoch_from_where_the_last_one_stopped():
    """The rule planned_share computes directly (one shard at most when shards < streams): shard j of an
    epoch's order goes to stream (epoch x n + j) mod streams; with shards >= streams, stream i reads
    order[i::streams]."""
    from data_pipeline.cursor import epoch_order, planned_share

    for n in range(1, 24):
        for streams in range(1, 30):
            for epoch in range(4):
                order = epoch_order(7, "pair/coco", epoch, n)
                for index in range(streams):
                    if n >= streams:
                        want = list(order[index::streams])
                    else:
                        want = [order[j] for j in range(n) if (epoch * n + j) % streams == index]
                    assert planned_share(7, "pair/coco", epoch, n, streams, index) == want


def test_the_elastic_view_from_rank_parts_is_the_merged_cursors_view():
    """Rank 0 builds the view a checkpoint keeps for another world size from each rank's small part (no
    shuffle buffers); it must say exactly what merging every rank's whole cursor says."""
    from data_pipeline.cursor import elastic_view, merge_states, rank_view_part

    cfg, listing = synthetic_config(buffer=8, batch=4), synthetic_listing(200)
    ranks, _ = build_world(cfg, listing, 6, None, measure=False)
    run_steps(ranks, 7, Drawn())
    states = [r.loader.state_dict() for r in ranks]
    merged, view = merge_states(states), elastic_view([rank_view_part(st) for st in states])
    for key, src in merged["sources"].items():
        assert view["sources"][key]["epochs"] == src["epochs"] and src["epochs"]
        assert view["sources"][key]["fresh_from"] == src["fresh_from"]
        assert view["sources"][key]["streams"] == {}  # O(shards): no stream's state travels
    for modality, mix in merged["mix"].items():
        picks = sum(s["picks"] for s in mix["streams"].values())
        assert view["mix"][modality]["base_picks"] == mix.get("base_picks", 0) + picks > 0
    assert len(json.dumps(view)) < len(json.dumps(states)) / 3
