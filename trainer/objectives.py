"""The pre-training objectives as one nn.Module whose forward returns every enabled loss.

DeepSpeed wraps this module, so that ZeRO-3 gathers parameters inside a single forward call; the maths of each
loss lives in model/losses.py; what is distributed (gathering features across ranks) is injected here as a
function, so the same code runs in one process and on many ranks.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from model import losses
from model.unimo import UnimoModel

GatherFn = Callable[[torch.Tensor], torch.Tensor]


def identity_gather(t: torch.Tensor) -> torch.Tensor:
    return t


def autograd_all_gather(t: torch.Tensor) -> torch.Tensor:
    """All-gathers along dim 0 with gradients flowing back to every rank's own slice."""
    import torch.distributed.nn.functional as dist_fn  # only imported on the distributed path

    return torch.cat(dist_fn.all_gather(t), dim=0)


class PretrainObjectives(nn.Module):
    """Computes the weighted objectives of one stage on one mixed micro-batch."""

    def __init__(self, model: UnimoModel, rank: int = 0, world_size: int = 1, gather: GatherFn | None = None):
        super().__init__()
        self.model = model
        self.rank = rank
        self.world_size = world_size
        self.gather = gather or (identity_gather if world_size == 1 else autograd_all_gather)

    def forward(self, batch: dict, weights: dict[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts: dict[str, torch.Tensor] = {}
        active = {k for k, w in weights.items() if w > 0}
        if active & {"mlm_text", "lm_text"}:
            parts.update(self._text_objectives(batch["text"], active))
        if "mim" in active:
            parts["mim"] = self._mim(batch["image"])
        if active & {"itc", "itm", "mlm_pair", "caption", "grounding"}:
            parts.update(self._pair_objectives(batch["pair"], active))
        total = sum(weights[name] * loss for name, loss in parts.items())
        return total, parts

    def _text_objectives(self, text: dict, active: set[str]) -> dict[str, torch.Tensor]:
        out = {}
        if "mlm_text" in active:
            states = self.model.encode_text(text["mlm_input_ids"], text["attention_mask"])
            out["mlm_text"] = losses.mlm_loss(self.model.mlm_logits_text(states[-1]), text["mlm_labels"])
        if "lm_text" in active:
            ids, mask = text["input_ids"], text["attention_mask"]
            prefix = _prefix_lengths(mask)
            states = self.model.encode_text(ids, mask, mask_mode="prefix", prefix_len=prefix)
            labels = _lm_labels(ids, mask, prefix)
            out["lm_text"] = losses.lm_loss(self.model.mlm_logits_text(states[-1]), labels)
        return out

    def _mim(self, image: dict) -> torch.Tensor:
        states = self.model.encode_image(image["pixels"], image["patch_mask"])
        pred = self.model.mim_predict(states[-1])
        return losses.mim_loss(pred, image["pixels"], image["patch_mask"], self.model.cfg.vision.patch_size)

    def _pair_objectives(self, pair: dict, active: set[str]) -> dict[str, torch.Tensor]:
        out = {}
        text_states = self.model.encode_text(pair["input_ids"], pair["attention_mask"])
        image_states = self.model.encode_image(pair["pixels"])
        if "itc" in active:
            txt, img = self.model.itc_features(text_states, image_states)
            out["itc"] = losses.itc_loss(txt, img, self.gather(txt), self.gather(img), self.model.logit_scale,
                                         self.rank)
        if "mlm_pair" in active:
            masked_states = self.model.encode_text(pair["mlm_input_ids"], pair["attention_mask"])
            t_fused, _ = self.model.fuse(masked_states, pair["attention_mask"], image_states)
            out["mlm_pair"] = losses.mlm_loss(self.model.mlm_logits_fused(t_fused), pair["mlm_labels"])
        return out


def _prefix_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Half of each sequence's real tokens (at least 1) is the bidirectional prefix."""
    lengths = mask.sum(dim=1)  # (B,)
    return torch.clamp(lengths // 2, min=1)


def _lm_labels(ids: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """Labels for the generated part only: prefix tokens and padding are ignored (-100)."""
    positions = torch.arange(ids.shape[1], device=ids.device)[None, :]  # (1, L)
    keep = (positions >= prefix[:, None]) & mask.bool()
    return torch.where(keep, ids, torch.full_like(ids, -100))
