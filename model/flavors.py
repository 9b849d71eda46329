"""Registry of named model sizes: debug (tests), small (CPU benchmarks), base, large, xl (ZeRO-3 scale)."""

from __future__ import annotations

from collections.abc import Callable

from model.config import FusionConfig, ModelConfig, TextConfig, VisionConfig


def _debug() -> ModelConfig:
    # text 2x64, vision 2x64 on 32x32 images with 8x8 patches, fusion 2x64, vocab 1024: seconds on CPU;
    # init_std 0.1 (ModelConfig's defaults are this flavor; model/config.py says why not 0.02)
    return ModelConfig(flavor="debug")


def _small() -> ModelConfig:
    # ~ 50M parameters: BERT-vocab text 6x384, ViT-S/16-like 6x384 at 224, fusion 2x384
    return ModelConfig(
        flavor="small",
        init_std=0.02,  # BERT's, sized for widths of 384-2048
        text=TextConfig(vocab_size=30522, layers=6, dim=384, heads=6, mlp_dim=1536, max_positions=512),
        vision=VisionConfig(image_size=224, patch_size=16, layers=6, dim=384, heads=6, mlp_dim=1536),
        fusion=FusionConfig(layers=2, dim=384, heads=6, mlp_dim=1536),
        embed_dim=256,
    )


def _base() -> ModelConfig:
    # BERT-base text, ViT-B/16 vision, 6 fusion layers (METER/BridgeTower base sizes)
    return ModelConfig(
        flavor="base",
        init_std=0.02,  # BERT's, sized for widths of 384-2048
        text=TextConfig(vocab_size=30522, layers=12, dim=768, heads=12, mlp_dim=3072, max_positions=512),
        vision=VisionConfig(image_size=224, patch_size=16, layers=12, dim=768, heads=12, mlp_dim=3072),
        fusion=FusionConfig(layers=6, dim=768, heads=12, mlp_dim=3072),
        embed_dim=256,
    )


def _large() -> ModelConfig:
    # BERT-large text, ViT-L/14 at 224, 6 fusion layers of width 1024
    return ModelConfig(
        flavor="large",
        init_std=0.02,  # BERT's, sized for widths of 384-2048
        text=TextConfig(vocab_size=30522, layers=24, dim=1024, heads=16, mlp_dim=4096, max_positions=512),
        vision=VisionConfig(image_size=224, patch_size=14, layers=24, dim=1024, heads=16, mlp_dim=4096),
        fusion=FusionConfig(layers=6, dim=1024, heads=16, mlp_dim=4096),
        embed_dim=512,
        activation_checkpointing=True,
    )


def _xl() -> ModelConfig:
    # ~ 4B parameters: the size that needs ZeRO-3 (text 32x2048, ViT-g/14-like 40x1408, fusion 12x2048)
    return ModelConfig(
        flavor="xl",
        init_std=0.02,  # BERT's, sized for widths of 384-2048
        text=TextConfig(vocab_size=30522, layers=32, dim=2048, heads=16, mlp_dim=8192, max_positions=512),
        vision=VisionConfig(image_size=224, patch_size=14, layers=40, dim=1408, heads=16, mlp_dim=6144),
        fusion=FusionConfig(layers=12, dim=2048, heads=16, mlp_dim=8192, levels=8),
        embed_dim=1024,
        activation_checkpointing=True,
    )


FLAVORS: dict[str, Callable[[], ModelConfig]] = {
    "debug": _debug,
    "small": _small,
    "base": _base,
    "large": _large,
    "xl": _xl,
}


def get_flavor(name: str) -> ModelConfig:
    """A fresh ModelConfig of the named flavor (callers may mutate it)."""
    if name not in FLAVORS:
        raise ValueError(f"unknown model flavor {name!r}; valid flavors: {', '.join(FLAVORS)}")
    return FLAVORS[name]()
