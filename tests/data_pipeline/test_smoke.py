"""Smoke test of the fixed interface on a small local synthetic dataset."""

import json

from data_pipeline import (
    DataConfig,
    SourceConfig,
    build_eval_pairs,
    build_loader,
    load_tokenizer,
    write_synthetic_dataset,
)


def test_interface_shapes(tmp_path):
    urls = write_synthetic_dataset(str(tmp_path), n_pairs=64, n_text=64, n_images=64, n_eval=16,
                                   samples_per_shard=16, image_size=32)
    cfg = DataConfig(text=SourceConfig(urls["text"], 2), image=SourceConfig(urls["image"], 3),
                     pair=SourceConfig(urls["pair"], 4), tokenizer=urls["tokenizer"], num_workers=0,
                     shuffle_buffer=8)
    loader = build_loader(cfg, rank=0, world_size=1, seq_len=24, image_size=32, patch_size=8)
    batch = next(iter(loader))
    assert batch["text"]["input_ids"].shape == (2, 24)
    assert batch["image"]["pixels"].shape == (3, 3, 32, 32)
    assert batch["image"]["patch_mask"].shape == (3, 16) and int(batch["image"]["patch_mask"].sum()) == 3 * 8
    assert batch["pair"]["neg_input_ids"].shape == (4, 24)
    assert len(batch["keys"]["pair"]) == 4
    json.dumps(loader.state_dict())
    assert loader.stats()["samples_pair"] == 4
    tok = load_tokenizer(urls["tokenizer"])
    assert tok.pad_id == 0 and tok.vocab_size <= 1000
    ev = build_eval_pairs(urls["eval"], seq_len=24, image_size=32, tokenizer=tok)
    assert ev["pixels"].shape[0] == 16 and ev["input_ids"].shape[0] == ev["text_image_index"].shape[0]
