"""UnimoModel: text encoder + vision encoder + two-stream cross-modal encoder + objective heads.

Objectives call the pieces they need (encode_text, encode_image, fuse, then a head), so one source's
micro-batch runs only its modules. Every parameter is used inside the forward of the module that owns it,
which is what ZeRO-3's per-module gathering requires.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig
from model.fusion import CrossModalEncoder
from model.heads import GroundingHead, ITMHead, MIMHead, TiedLMHead
from model.text_encoder import TextEncoder
from model.vision_encoder import PatchEmbeddings, VisionEncoder, init_conv_stem_


def _last(states) -> Tensor:
    return states if isinstance(states, Tensor) else states[-1]


class _CapKeepingDescent(torch.autograd.Function):
    """min(x, cap) whose gradient is blocked only where it would raise x further above the cap.

    A plain clamp gives no gradient at all at or above the cap: once Adam's momentum carried the temperature's
    parameter there (it has no weight decay), nothing could bring it down again, even when the loss wanted a
    softer temperature. CLIP's training clamps the parameter itself after each step, which under ZeRO would
    mean writing the optimizer's partitioned fp32 master copy; blocking only the rising direction is the same
    bound in the graph: the scale never exceeds the cap, and the parameter can descend from it.
    """

    @staticmethod
    def forward(x: Tensor, cap: float) -> Tensor:
        return x.clamp(max=cap)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, cap = inputs
        ctx.save_for_backward(x)
        ctx.cap = cap

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        rising = (x >= ctx.cap) & (grad < 0)  # a descent step (-grad) would raise x
        return grad.masked_fill(rising, 0.0), None


def capped_logit_scale(logit_scale: Tensor, max_scale: float) -> Tensor:
    """exp(logit_scale) capped at ``max_scale`` (ITC's inverse temperature, at most 100 as in CLIP)."""
    return _CapKeepingDescent.apply(logit_scale.float().exp(), max_scale)


class UnimoModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        t, v, f = cfg.text, cfg.vision, cfg.fusion
        ckpt = cfg.activation_checkpointing
        self.text = TextEncoder(t, ckpt)
        self.vision = VisionEncoder(v, ckpt)
        self.fusion = CrossModalEncoder(f, t.dim, t.layers, v.dim, v.layers, ckpt)
        self.num_patches = v.num_patches
        # heads
        self.text_proj = nn.Linear(t.dim, cfg.embed_dim, bias=False)
        self.image_proj = nn.Linear(v.dim, cfg.embed_dim, bias=False)
        # shape (1,), not a 0-d scalar: DeepSpeed broadcasts parameters as byte views, impossible for 0-d
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / cfg.temperature_init)]))
        word = self.text.embeddings.word
        self.mlm_text_head = TiedLMHead(t.dim, word, t.layer_norm_eps, t.activation)
        self.mlm_fused_head = TiedLMHead(f.dim, word, t.layer_norm_eps, t.activation)
        self.lm_fused_head = TiedLMHead(f.dim, word, t.layer_norm_eps, t.activation)
        self.itm_head = ITMHead(f.dim)
        self.mim_head = MIMHead(v.dim, v.patch_size, v.channels)
        self.grounding_head = GroundingHead(f.dim, cfg.embed_dim)
        self.apply(self._init_weights)
        if self.cfg.vision.stem == "conv":
            init_conv_stem_(self.vision.embeddings.proj)
        self._load_pretrained()

    def _load_pretrained(self) -> None:
        if not (self.cfg.text_init or self.cfg.vision_init):
            return
        from model.hf_loading import load_text_encoder, load_vision_encoder

        if self.cfg.text_init:
            load_text_encoder(self, self.cfg.text_init)
        if self.cfg.vision_init:
            load_vision_encoder(self, self.cfg.vision_init)

    def _init_weights(self, m: nn.Module) -> None:
        std = self.cfg.init_std
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbeddings):  # its bare parameters
            for p in (m.pos, m.cls, m.mask_token):
                nn.init.normal_(p, std=std)

    # ------------------------------------------------------------------------------------------ encoders
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None, mask_mode: str = "bidirectional",
                    prefix_len=None, token_type_ids: Tensor | None = None) -> list[Tensor]:
        """input_ids (B, L) -> one (B, L, Dt) per layer; [-1] is final."""
        return self.text(input_ids, attention_mask, mask_mode, prefix_len, token_type_ids)

    def encode_image(self, pixels: Tensor, patch_mask: Tensor | None = None) -> list[Tensor]:
        """pixels (B, 3, H, W) normalised; patch_mask (B, N) True=masked -> one (B, 1+N, Dv) per layer."""
        return self.vision(pixels, patch_mask)

    def fuse(self, text_states, text_mask: Tensor | None, image_states,
             text_causal: bool = False) -> tuple[Tensor, Tensor]:
        """Per-layer unimodal states -> fused text (B, L, Df) and image (B, 1+N, Df)."""
        return self.fusion(text_states, text_mask, image_states, text_causal)

    # --------------------------------------------------------------------------------------------- heads
    def itc_features(self, text_states, image_states) -> tuple[Tensor, Tensor]:
        """Final CLS of each encoder -> L2-normalised (B, E) text and image features."""
        txt = self.text_proj(_last(text_states)[:, 0])
        img = self.image_proj(_last(image_states)[:, 0])
        return F.normalize(txt, dim=-1), F.normalize(img, dim=-1)

    def mlm_logits_text(self, h: Tensor) -> Tensor:
        return self.mlm_text_head(h)  # (B, L, Dt) -> (B, L, V)

    def mlm_logits_fused(self, h: Tensor) -> Tensor:
        return self.mlm_fused_head(h)  # (B, L, Df) -> (B, L, V)

    def lm_logits_fused(self, h: Tensor) -> Tensor:
        return self.lm_fused_head(h)  # (B, L, Df) -> (B, L, V); position i predicts token i+1

    def itm_logits(self, t_fused: Tensor, v_fused: Tensor) -> Tensor:
        return self.itm_head(t_fused[:, 0], v_fused[:, 0])  # (B, 2)

    def mim_predict(self, v_last: Tensor) -> Tensor:
        return self.mim_head(v_last)  # (B, 1+N, Dv) -> (B, N, P*P*C)

    def grounding_scores(self, t_fused: Tensor, v_fused: Tensor) -> Tensor:
        return self.grounding_head(t_fused, v_fused)  # (B, L, N)

    def temperature_scale(self) -> Tensor:
        """exp(logit_scale) capped at max_logit_scale, as the ITC loss uses it."""
        return capped_logit_scale(self.logit_scale, self.cfg.max_logit_scale)
