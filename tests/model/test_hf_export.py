"""Our towers written as Hugging Face folders load in `transformers` and give the same hidden states (fp32,
1e-5); loading such a folder back (model/hf_loading) restores the very same weights."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model.config import ModelConfig, TextConfig, VisionConfig
from model.hf_loading import (
    load_text_encoder,
    load_vision_encoder,
    save_text_encoder,
    save_vision_encoder,
    text_config_from_hf,
    vision_config_from_hf,
)
from model.unimo import UnimoModel

TOL = 1e-5


def _perturbed(cfg: ModelConfig) -> UnimoModel:
    # our init has zero biases and unit LayerNorms; perturb every weight so the key mapping is really checked
    torch.manual_seed(3)
    model = UnimoModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _text_inputs(pad_id: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = pad_id, 0
    return ids, mask


@pytest.mark.parametrize("style", ["absolute", "roberta"])
def test_text_tower_exports_as_a_bert_or_roberta_folder(tmp_path, style):
    text = TextConfig(position_style=style, pad_token_id=1 if style == "roberta" else 0,
                      activation="gelu_tanh")
    ours = _perturbed(ModelConfig(text=text))
    save_text_encoder(ours, str(tmp_path))
    hf, info = transformers.AutoModel.from_pretrained(str(tmp_path), output_loading_info=True)
    hf = hf.eval()
    assert not info["unexpected_keys"] and all(k.startswith("pooler.") for k in info["missing_keys"])
    assert type(hf).__name__ == ("RobertaModel" if style == "roberta" else "BertModel")
    ids, mask = _text_inputs(text.pad_token_id, text.vocab_size)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1:]
        got = ours.encode_text(ids, mask)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert (g - r)[mask.bool()].abs().max().item() < TOL
    # and back: the folder's config gives our config, its weights our weights
    assert text_config_from_hf(str(tmp_path)) == text
    back = UnimoModel(ModelConfig(text=text))
    report = load_text_encoder(back, str(tmp_path))
    assert not report.missing and not report.unexpected
    for name, p in ours.text.named_parameters():
        assert torch.equal(p, dict(back.text.named_parameters())[name]), name


@pytest.mark.parametrize("layout", ["vit", "clip"])
def test_vision_tower_exports_as_a_vit_or_clip_vision_folder(tmp_path, layout):
    clip = layout == "clip"
    vision = VisionConfig(pre_layernorm=clip, patch_bias=not clip,
                          activation="quick_gelu" if clip else "gelu", layer_norm_eps=1e-5 if clip else 1e-12)
    ours = _perturbed(ModelConfig(vision=vision))
    save_vision_encoder(ours, str(tmp_path))
    hf, info = transformers.AutoModel.from_pretrained(str(tmp_path), output_loading_info=True)
    hf = hf.eval()
    assert not info["unexpected_keys"] and all(k.startswith("pooler.") for k in info["missing_keys"])
    assert type(hf).__name__ == ("CLIPVisionModel" if clip else "ViTModel")
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = hf(pixel_values=px, output_hidden_states=True)
        got = ours.encode_image(px)
    for i in range(len(got) - 1):
        assert (got[i] - out.hidden_states[i + 1]).abs().max().item() < TOL
    # CLIP applies post_layernorm to the pooled CLS only; we apply it to every token of the last layer
    # its layout differs across versions
    post = getattr(hf, "vision_model", hf).post_layernorm if clip else None
    last = post(out.last_hidden_state) if clip else out.last_hidden_state
    assert (got[-1] - last).abs().max().item() < TOL
    assert vision_config_from_hf(str(tmp_path)) == vision
    back = UnimoModel(ModelConfig(vision=vision))
    report = load_vision_encoder(back, str(tmp_path))
    assert not report.missing and not report.unexpected
    for name, p in ours.vision.named_parameters():
        if name != "embeddings.mask_token":  # MIM's learned [MASK] patch has no ViT/CLIP field
            assert torch.equal(p, dict(back.vision.named_parameters())[name]), name
    # the image processor written beside it prepares pixels as the pipeline does: (x/255 - 0.5)/0.5
    proc = transformers.AutoImageProcessor.from_pretrained(str(tmp_path))
    img = (torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy()
    pv = proc(images=img, return_tensors="pt")["pixel_values"]
    assert pv.shape == (1, 3, 32, 32)
    expected = (torch.from_numpy(img).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    assert (pv[0] - expected).abs().max().item() < 1e-2  # resize to the same size is (near) the identity


def test_a_vision_layout_no_transformers_class_loads_is_refused(tmp_path):
    model = UnimoModel(ModelConfig(vision=VisionConfig(pre_layernorm=True, patch_bias=True)))
    with pytest.raises(ValueError, match="neither ViT's layout"):
        save_vision_encoder(model, str(tmp_path))
