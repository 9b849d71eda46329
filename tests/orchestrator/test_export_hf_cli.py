"""`unimo export --format hf` on a real ZeRO-3 checkpoint: transformers loads the text tower (with its
tokenizer) and the vision tower, and they compute what the exported unimo model computes on the held-out
data."""

from __future__ import annotations

import json

import pytest
import torch

from orchestrator.cli import main
from trainer.export import load_exported

# Integration tier: a real ZeRO-3 checkpoint written by a child process.
pytestmark = pytest.mark.integration

transformers = pytest.importorskip("transformers")
pytest.importorskip("deepspeed")
TOL = 1e-5


def test_export_hf_towers_match_the_exported_model(world, tmp_path, capsys):
    from data_pipeline.loader import build_eval_pairs
    from data_pipeline.tokenizer import load_tokenizer

    out = tmp_path / "export"
    assert main(["export", str(world["ckpt"]), str(out), "--format", "hf"]) == 0
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json", "text",
                                                "vision"}
    ours = load_exported(out).eval()
    assert json.loads((out / "text" / "config.json").read_text())["model_type"] == "bert"

    tok = load_tokenizer(str(out / "tokenizer.json"))
    es = build_eval_pairs(world["data"], seq_len=32, image_size=ours.cfg.vision.image_size,
                          tokenizer=tok, limit=6)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out / "text"))
    enc = hf_tok(es["captions"], padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    assert torch.equal(enc["input_ids"], es["input_ids"]) and torch.equal(enc["attention_mask"],
                                                                           es["attention_mask"])

    text = transformers.AutoModel.from_pretrained(str(out / "text")).eval()
    vision = transformers.AutoModel.from_pretrained(str(out / "vision")).eval()
    with torch.no_grad():
        ref_t = text(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        got_t = ours.encode_text(es["input_ids"], es["attention_mask"])[-1]
        ref_v = vision(pixel_values=es["pixels"]).last_hidden_state
        got_v = ours.encode_image(es["pixels"])[-1]
    valid = es["attention_mask"].bool()
    assert (ref_t - got_t)[valid].abs().max().item() < TOL
    assert (ref_v - got_v).abs().max().item() < TOL
