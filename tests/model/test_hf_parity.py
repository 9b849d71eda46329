"""Weights loaded from tiny random transformers checkpoints reproduce their hidden states (fp32, 1e-5)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model.config import ModelConfig
from model.hf_loading import (
    load_text_encoder,
    load_vision_encoder,
    text_config_from_hf,
    vision_config_from_hf,
)
from model.unimo import UnimoModel

TOL = 1e-5
TINY_TEXT = {"vocab_size": 120, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 48, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
TINY_VISION = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
               "num_attention_heads": 4, "intermediate_size": 48}


def _save(hf_model, path, safe=True):
    # transformers' random init has zero biases and unit LayerNorms; perturb so the mapping is really checked
    torch.manual_seed(1)
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf_model.save_pretrained(path, safe_serialization=safe)
    return hf_model.eval()


def _text_model(path, **kw):
    cfg = ModelConfig(text=text_config_from_hf(str(path)), **kw)
    return UnimoModel(cfg).eval()


def _text_inputs(pad_id, vocab=120):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = pad_id, 0  # one padded row
    return ids, mask


def _compare_text(ours, hf, ids, mask):
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        got = ours.encode_text(ids, mask)
    assert len(got) == len(ref) - 1
    valid = mask.bool()
    for i, (g, r) in enumerate(zip(got, ref[1:])):
        err = (g - r)[valid].abs().max().item()  # padding rows' outputs are unconstrained
        assert err < TOL, f"layer {i}: max abs diff {err}"


@pytest.mark.parametrize("safe", [True, False])
def test_bert_parity(tmp_path, safe):
    hf = _save(transformers.BertModel(transformers.BertConfig(max_position_embeddings=64, **TINY_TEXT)),
               tmp_path, safe)
    ours = _text_model(tmp_path)
    report = load_text_encoder(ours, str(tmp_path))
    assert not report.missing and not report.unexpected
    assert any(k.startswith("pooler.") for k in report.ignored)
    _compare_text(ours, hf, *_text_inputs(0))


def test_roberta_parity_position_offset(tmp_path):
    hf_cfg = transformers.RobertaConfig(max_position_embeddings=66, pad_token_id=1, **TINY_TEXT)
    hf = _save(transformers.RobertaModel(hf_cfg), tmp_path)
    ours = _text_model(tmp_path)
    assert ours.cfg.text.position_style == "roberta" and ours.cfg.text.max_seq_len == 64
    load_text_encoder(ours, str(tmp_path))
    _compare_text(ours, hf, *_text_inputs(1))


def test_bert_mlm_head_loaded_and_tied(tmp_path):
    hf = _save(transformers.BertForMaskedLM(transformers.BertConfig(max_position_embeddings=64, **TINY_TEXT)),
               tmp_path)
    ours = _text_model(tmp_path)
    report = load_text_encoder(ours, str(tmp_path))
    assert "mlm_text_head.dense.weight" in report.loaded and not report.unexpected
    ids, mask = _text_inputs(0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        got = ours.mlm_logits_text(ours.encode_text(ids, mask)[-1])
    assert (got - ref)[mask.bool()].abs().max().item() < 1e-4  # logits are larger numbers than states
    assert ours.mlm_text_head.decoder.weight is ours.text.embeddings.word.weight


def _vision_model(path):
    return UnimoModel(ModelConfig(vision=vision_config_from_hf(str(path)))).eval()


def _pixels(size=32):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_vit_parity(tmp_path):
    hf = _save(transformers.ViTModel(transformers.ViTConfig(**TINY_VISION)), tmp_path)
    ours = _vision_model(tmp_path)
    report = load_vision_encoder(ours, str(tmp_path))
    assert not report.missing and not report.unexpected
    px = _pixels()
    with torch.no_grad():
        out = hf(pixel_values=px, output_hidden_states=True)
        got = ours.encode_image(px)
    for i in range(len(got) - 1):
        assert (got[i] - out.hidden_states[i + 1]).abs().max().item() < TOL
    assert (got[-1] - out.last_hidden_state).abs().max().item() < TOL  # ViT's final layernorm included


def test_vit_interpolated_positions_match_hf(tmp_path):
    hf = _save(transformers.ViTModel(transformers.ViTConfig(**TINY_VISION)), tmp_path)
    ours = _vision_model(tmp_path)
    load_vision_encoder(ours, str(tmp_path))
    px = _pixels(48)  # 6x6 patches instead of 4x4
    with torch.no_grad():
        ref = hf(pixel_values=px, interpolate_pos_encoding=True).last_hidden_state
        got = ours.encode_image(px)[-1]
    assert got.shape == (2, 37, 32)
    assert (got - ref).abs().max().item() < TOL


@pytest.mark.parametrize("full_clip", [False, True])
def test_clip_vision_parity(tmp_path, full_clip):
    vcfg = transformers.CLIPVisionConfig(**TINY_VISION)
    if full_clip:  # a whole CLIPModel folder: the text tower is reported as ignored, not unexpected
        text = {"vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                "intermediate_size": 48}
        cfg = transformers.CLIPConfig(text_config=text,
                                      vision_config=vcfg.to_dict(), projection_dim=16)
        hf = _save(transformers.CLIPModel(cfg), tmp_path)
    else:
        hf = _save(transformers.CLIPVisionModel(vcfg), tmp_path)
    hf = getattr(hf, "vision_model", hf)  # the vision transformer itself (its layout differs across versions)
    ours = _vision_model(tmp_path)
    assert ours.cfg.vision.pre_layernorm and ours.cfg.vision.activation == "quick_gelu"
    report = load_vision_encoder(ours, str(tmp_path))
    assert not report.missing and not report.unexpected
    if full_clip:
        assert any(k.startswith("text_model.") for k in report.ignored)
    px = _pixels()
    with torch.no_grad():
        out = hf(pixel_values=px, output_hidden_states=True)
        got = ours.encode_image(px)
    for i in range(len(got) - 1):
        assert (got[i] - out.hidden_states[i + 1]).abs().max().item() < TOL
    # CLIP applies post_layernorm to the pooled CLS only; we apply it to every token of the last layer
    ref_last = hf.post_layernorm(out.last_hidden_state)
    assert (got[-1] - ref_last).abs().max().item() < TOL
    assert (got[-1][:, 0] - out.pooler_output).abs().max().item() < TOL


def test_weights_trained_on_other_pixel_statistics_are_said_at_load(tmp_path):
    """CLIP normalises pixels with its own mean and std (its preprocessor_config.json); unimo's loader with
    0.5 and 0.5: loading CLIP weights says so instead of starting the tower on shifted inputs in silence. A
    ViT's 0.5 / 0.5 says nothing."""
    import json
    import warnings

    _save(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_VISION)), tmp_path)
    ours = _vision_model(tmp_path)
    config = tmp_path / "preprocessor_config.json"
    config.write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_vision_encoder(ours, str(tmp_path))
    config.write_text(json.dumps({"image_mean": [0.48145466, 0.4578275, 0.40821073],
                                  "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    with pytest.warns(UserWarning, match=r"normalised with mean \[0.48145466.*loader normalises every image"):
        load_vision_encoder(ours, str(tmp_path))


def test_missing_and_unexpected_weights_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _save(transformers.BertModel(transformers.BertConfig(max_position_embeddings=64, **TINY_TEXT)), tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(str(f))
    del sd["encoder.layer.1.attention.self.key.weight"]
    sd["encoder.layer.1.surprise.weight"] = torch.zeros(3)
    save_file(sd, str(f))
    ours = _text_model(tmp_path)
    with pytest.raises(ValueError) as e:
        load_text_encoder(ours, str(tmp_path))
    msg = str(e.value)
    assert "text.blocks.1.attn.qkv.weight" in msg and "encoder.layer.1.attention.self.key.weight" in msg
    assert "encoder.layer.1.surprise.weight" in msg
    with pytest.warns(UserWarning, match="surprise"):
        report = load_text_encoder(ours, str(tmp_path), strict=False)
    assert report.unexpected == ["encoder.layer.1.surprise.weight"]
    assert report.missing and "text.blocks.1.attn.qkv.weight" in report.missing[0]


def test_config_mismatch_is_an_error(tmp_path):
    _save(transformers.BertModel(transformers.BertConfig(max_position_embeddings=64, **TINY_TEXT)), tmp_path)
    cfg = ModelConfig(text=text_config_from_hf(str(tmp_path), heads=8))
    with pytest.raises(ValueError, match="heads"):
        load_text_encoder(UnimoModel(cfg), str(tmp_path))


def test_model_config_init_paths(tmp_path):
    text_dir, vision_dir = tmp_path / "bert", tmp_path / "vit"
    hf_t = _save(transformers.BertModel(transformers.BertConfig(max_position_embeddings=64, **TINY_TEXT)),
                 text_dir)
    hf_v = _save(transformers.ViTModel(transformers.ViTConfig(**TINY_VISION)), vision_dir)
    cfg = ModelConfig(text=text_config_from_hf(str(text_dir)), vision=vision_config_from_hf(str(vision_dir)),
                      text_init=str(text_dir), vision_init=str(vision_dir))
    ours = UnimoModel(cfg).eval()
    _compare_text(ours, hf_t, *_text_inputs(0))
    px = _pixels()
    with torch.no_grad():
        assert (ours.encode_image(px)[-1] - hf_v(pixel_values=px).last_hidden_state).abs().max() < TOL
