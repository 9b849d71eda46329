"""Batches built for a run's objectives: only the parts those read, from the same samples in the same
order."""

import pytest
import torch

from data_pipeline import DataConfig, SourceConfig, build_loader

GEOMETRY = {"seq_len": 16, "image_size": 16, "patch_size": 8}
ALWAYS = {"input_ids", "attention_mask", "pixels", "image_ids", "epoch"}


def _batches(urls, objectives, workers, n=4):
    cfg = DataConfig(text=SourceConfig(urls["text"], 3), pair=SourceConfig(urls["pair"], 4),
                     tokenizer=urls["tokenizer"], num_workers=workers, shuffle_buffer=8, seed=5)
    loader = build_loader(cfg, rank=0, world_size=1, objectives=objectives, **GEOMETRY)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            return out, loader.state_dict()


# 2: worker processes
@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.integration)])
def test_objectives_decide_the_parts_not_the_samples(local_data, workers):
    full, full_state = _batches(local_data, None, workers)
    lean, lean_state = _batches(local_data, {"itc", "mlm_pair", "lm_text"}, workers)
    assert lean_state == full_state
    mlm = {"mlm_input_ids", "mlm_labels"}
    cmcl = {"pos_input_ids", "pos_attention_mask", "neg_input_ids", "neg_attention_mask", "neg_kind"}
    for a, b in zip(full, lean):
        assert a["keys"] == b["keys"]
        assert set(b["pair"]) == ALWAYS | mlm | cmcl  # no phrase ids, no tags
        assert set(b["text"]) == {"input_ids", "attention_mask", "epoch"}  # no MLM masks for lm_text
        for src in ("text", "pair"):
            for name, value in b[src].items():  # what is built is what the full batch holds
                assert torch.equal(value, a[src][name]), (src, name)
    assert {"phrase_ids", "tag_input_ids"} <= set(full[0]["pair"]) and mlm <= set(full[0]["text"])


def test_without_mlm_the_rewrites_still_come_for_every_caption(local_data):
    """A pair's RNG draws its MLM mask before its rewrite: without MLM the rewrites differ, never the rest."""
    full, _ = _batches(local_data, None, 0)
    lean, _ = _batches(local_data, {"itc"}, 0)
    for a, b in zip(full, lean):
        assert a["keys"] == b["keys"] and "mlm_labels" not in b["pair"]
        assert torch.equal(a["pair"]["input_ids"], b["pair"]["input_ids"])
        assert torch.equal(a["pair"]["pos_input_ids"], b["pair"]["pos_input_ids"])
        rewritten = b["pair"]["neg_kind"] >= 0
        assert rewritten.any()
        # Every caption given a rewrite gets one that is not the caption itself.
        differs = (b["pair"]["neg_input_ids"] != b["pair"]["input_ids"]).any(dim=1)
        assert differs[rewritten].all()


def test_unknown_objective_is_an_error_naming_it(local_data):
    with pytest.raises(ValueError, match="mlm_pairs"):
        _batches(local_data, {"itc", "mlm_pairs"}, 0)
