"""ViT / CLIP-vision compatible image encoder with patch masking for masked image modeling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import VisionConfig
from model.layers import PreLNBlock, dropout, run_block


def interpolate_positions(pos: Tensor, grid_h: int, grid_w: int) -> Tensor:
    """(1, 1+N0, D) learned positions on a square grid -> (1, 1+h*w, D), bicubic on the patch part."""
    n0 = pos.shape[1] - 1
    g0 = round(n0 ** 0.5)
    if g0 == grid_h == grid_w:
        return pos
    cls, grid = pos[:, :1], pos[:, 1:]
    D = pos.shape[-1]
    grid = grid.reshape(1, g0, g0, D).permute(0, 3, 1, 2)  # (1, D, g0, g0)
    # bicubic in fp32: low-precision bicubic is not implemented on every backend
    grid = F.interpolate(grid.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    grid = grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, D)
    return torch.cat([cls, grid], dim=1)


def conv_stem(cfg: VisionConfig) -> nn.Sequential:
    """Early convolutions in place of the patch projection: log2(patch_size) - 1 3x3 stride-2 convs with GELU
    (stem_channels, doubled at each), then a 2x2 stride-2 conv to dim: (B, C, H, W) -> (B, dim, H/P, W/P)."""
    mods: list[nn.Module] = []
    c_in, c_out, side = cfg.channels, cfg.stem_channels, cfg.patch_size
    while side > 2:
        mods += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GELU()]
        c_in, c_out, side = c_out, 2 * c_out, side // 2
    mods.append(nn.Conv2d(c_in, cfg.dim, 2, stride=2, bias=cfg.patch_bias))
    return nn.Sequential(*mods)


def init_conv_stem_(stem: nn.Sequential) -> None:
    """Fan-in (He) initialisation of the stem's convolutions, biases zero.

    The model's normal(init_std) initialisation suits one linear projection, not a chain of convolutions: each
    layer scales the signal by ~init_std x sqrt(fan_in), so with the larger flavors' 0.02 the image reached
    the first block about 40x below the position embeddings (std 0.0005 at init in the `small` flavor). He
    initialisation keeps each layer's output at about its input's scale (GELU layers with ReLU's gain, the
    last one linear)."""
    convs = [m for m in stem if isinstance(m, nn.Conv2d)]
    for i, conv in enumerate(convs):
        nn.init.kaiming_normal_(conv.weight, mode="fan_in",
                                nonlinearity="relu" if i < len(convs) - 1 else "linear")
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)


def blank_masked_patches(pixels: Tensor, patch_mask: Tensor, patch_size: int) -> Tensor:
    """``pixels`` with the masked patches set to 0 (mid-grey of the [-1, 1] input): what a conv stem must not
    see. Its tokens reach a few pixels past their own patch, so a mask token swapped in after the stem still
    left an unmasked neighbour's token seeing most of a masked patch (39 of 64 pixels at patch 8), and MIM
    could copy its answer instead of inferring it."""
    B, _, H, W = pixels.shape
    keep = ~patch_mask.bool().view(B, 1, H // patch_size, W // patch_size)
    keep = keep.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)
    return pixels * keep.to(pixels.dtype)


class PatchEmbeddings(nn.Module):
    """conv patches, MIM mask token, CLS, learned (interpolated) positions, optional CLIP pre-LN."""

    whole_unit = True  # layers.whole_units

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.stem == "conv":
            self.proj = conv_stem(cfg)
        else:
            self.proj = nn.Conv2d(cfg.channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size,
                                  bias=cfg.patch_bias)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, cfg.dim))
        self.pre_ln = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps) if cfg.pre_layernorm else None
        self.drop_p = cfg.dropout  # applied with layers.dropout (no module)

    def forward(self, pixels: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        P = self.cfg.patch_size
        H, W = pixels.shape[-2:]
        if H % P or W % P:
            raise ValueError(f"image size {H}x{W} is not a multiple of patch_size={P}")
        B, N = pixels.shape[0], (H // P) * (W // P)
        if patch_mask is not None:
            if patch_mask.shape != (B, N):
                raise ValueError(f"patch_mask shape {tuple(patch_mask.shape)} != (B, N) = {(B, N)}")
            if self.cfg.stem == "conv":
                pixels = blank_masked_patches(pixels, patch_mask, P)
        # the dtype of this module's own parameter: self.proj may be a Sequential (conv stem)
        x = self.proj(pixels.to(self.cls.dtype)).flatten(2).transpose(1, 2)  # (B, N, D)
        if patch_mask is not None:
            # masked patches lose their content but keep their position, as in BEiT/SimMIM
            x = torch.where(patch_mask[..., None].bool(), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls.expand(B, -1, -1).to(x.dtype), x], dim=1)  # (B, 1+N, D)
        x = x + interpolate_positions(self.pos, H // P, W // P)
        if self.pre_ln is not None:
            x = self.pre_ln(x)
        return dropout(x, self.drop_p, self.training)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, checkpointing: bool = False):
        super().__init__()
        self.cfg = cfg
        self.checkpointing = checkpointing
        self.embeddings = PatchEmbeddings(cfg)
        self.blocks = nn.ModuleList(
            PreLNBlock(cfg.dim, cfg.heads, cfg.mlp_dim, cfg.layer_norm_eps, cfg.dropout, cfg.activation,
                       cfg.qkv_bias)
            for _ in range(cfg.layers)
        )
        self.final_ln = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps) if cfg.final_layernorm else None

    def forward(self, pixels: Tensor, patch_mask: Tensor | None = None) -> list[Tensor]:
        """pixels (B, C, H, W) -> one (B, 1+N, D) per layer; the last one passed through the final LN."""
        x = self.embeddings(pixels, patch_mask)
        states = []
        for block in self.blocks:
            x = run_block(block, self.checkpointing, x)
            states.append(x)
        if self.final_ln is not None:
            states[-1] = self.final_ln(states[-1])
        return states
