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


class PatchEmbeddings(nn.Module):
    """conv patches, MIM mask token, CLS, learned (interpolated) positions, optional CLIP pre-LN."""

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
        # the dtype of this module's own parameter: self.proj may be a Sequential (conv stem)
        x = self.proj(pixels.to(self.cls.dtype)).flatten(2).transpose(1, 2)  # (B, N, D)
        B, N, _ = x.shape
        if patch_mask is not None:
            if patch_mask.shape != (B, N):
                raise ValueError(f"patch_mask shape {tuple(patch_mask.shape)} != (B, N) = {(B, N)}")
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
