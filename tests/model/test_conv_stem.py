"""model.vision.stem=conv: early convolutions in place of the linear patch projection."""

import dataclasses

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model.config import ModelConfig, VisionConfig
from model.flavors import get_flavor
from model.flops import flops_per_sample, patch_embed_flops
from model.hf_loading import vision_hf_config
from model.unimo import UnimoModel
from model.vision_encoder import conv_stem


def _cfg(**vision) -> ModelConfig:
    cfg = get_flavor("debug")
    cfg.vision = VisionConfig(**{"image_size": 48, "stem": "conv", **vision})
    return cfg


def test_conv_stem_layout_and_one_token_per_patch():
    v = VisionConfig(image_size=48, patch_size=8, stem="conv", stem_channels=32)
    stem = conv_stem(v)
    convs = [m for m in stem if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 32, (3, 3), (2, 2)), (32, 64, (3, 3), (2, 2)), (64, 64, (2, 2), (2, 2))]
    assert stem(torch.randn(2, 3, 48, 48)).shape == (2, 64, 6, 6)
    # patch 16: one more stride-2 conv, channels doubled again
    assert len([m for m in conv_stem(VisionConfig(image_size=32, patch_size=16, stem="conv"))
                if isinstance(m, nn.Conv2d)]) == 4


def test_conv_stem_model_shapes_init_and_gradients():
    torch.manual_seed(0)
    cfg = _cfg()
    m = UnimoModel(cfg)
    first = m.vision.embeddings.proj[0]
    assert isinstance(first, nn.Conv2d)
    px = torch.randn(2, 3, 48, 48)
    mask = torch.zeros(2, m.num_patches, dtype=torch.bool)
    mask[:, ::4] = True
    states = m.encode_image(px, mask)
    assert states[-1].shape == (2, 1 + 36, cfg.vision.dim)
    states[-1].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.vision.embeddings.proj.parameters())


def test_conv_stem_runs_in_bf16():
    m = UnimoModel(_cfg()).to(torch.bfloat16)
    assert m.encode_image(torch.randn(1, 3, 48, 48))[-1].dtype == torch.bfloat16


def test_conv_stem_flops_match_counter():
    cfg = _cfg()
    m = UnimoModel(cfg).eval()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        m.vision.embeddings.proj(torch.randn(1, 3, 48, 48))
    assert patch_embed_flops(cfg, 36) == counter.get_total_flops()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        m.mim_predict(m.encode_image(torch.randn(1, 3, 48, 48), torch.rand(1, 36) < 0.5)[-1])
    analytic = flops_per_sample(cfg, "image", seq_len=12, objectives=["mim"], backward=False)
    assert abs(analytic - counter.get_total_flops()) <= 0.05 * counter.get_total_flops()


@pytest.mark.parametrize("patch", [6, 2, 12])
def test_conv_stem_needs_a_power_of_two_patch(patch):
    with pytest.raises(ValueError, match="patch_size"):
        VisionConfig(image_size=48, patch_size=patch, stem="conv")


def test_stem_choices_and_linear_default():
    assert VisionConfig().stem == "linear"
    assert isinstance(UnimoModel(get_flavor("debug")).vision.embeddings.proj, nn.Conv2d)
    with pytest.raises(ValueError, match="stem"):
        VisionConfig(stem="resnet")


def test_conv_stem_is_not_exported_as_vit():
    with pytest.raises(ValueError, match="stem"):
        vision_hf_config(VisionConfig(image_size=48, stem="conv"))


@pytest.mark.parametrize("flavor, image_size", [("debug", 48), ("small", 64)])
def test_conv_stem_starts_at_the_linear_stems_scale(flavor, image_size):
    """He initialisation: the image reaches the first block at about the scale a linear stem gives it (with
    the model's normal(init_std), the `small` flavor's conv stem started ~600x below its linear stem)."""
    def stem_std(stem: str) -> float:
        torch.manual_seed(0)
        cfg = get_flavor(flavor)
        cfg.vision = dataclasses.replace(cfg.vision, image_size=image_size, stem=stem)
        proj = UnimoModel(cfg).vision.embeddings.proj
        with torch.no_grad():
            return float(proj(torch.rand(4, 3, image_size, image_size) * 2 - 1).std())

    linear, conv = stem_std("linear"), stem_std("conv")
    assert linear / 4 < conv < linear * 4, (linear, conv)


def test_conv_stem_sees_no_pixel_of_a_masked_patch():
    """MIM with a conv stem: changing a masked patch's pixels changes no token (each token's receptive field
    reaches into its neighbours' patches, so the mask is applied to the pixels before the stem)."""
    torch.manual_seed(0)
    m = UnimoModel(_cfg()).eval()
    px = torch.randn(1, 3, 48, 48)
    mask = torch.zeros(1, m.num_patches, dtype=torch.bool)
    mask[0, 7] = True  # patch (row 1, col 1) of the 6 x 6 grid: pixels 8..15 both ways
    other = px.clone()
    other[..., 8:16, 8:16] = torch.randn(3, 8, 8)
    with torch.no_grad():
        a, b = m.vision.embeddings(px, mask), m.vision.embeddings(other, mask)
        assert torch.equal(a, b)
        # without the mask its neighbours (patches 8 and 13: right and below) do see those pixels
        a, b = m.vision.embeddings(px), m.vision.embeddings(other)
        assert not torch.equal(a[:, 1 + 8], b[:, 1 + 8]) and not torch.equal(a[:, 1 + 13], b[:, 1 + 13])
