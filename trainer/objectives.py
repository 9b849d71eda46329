"""The pre-training objectives as one nn.Module whose forward returns every enabled loss.

DeepSpeed wraps this module, so that ZeRO-3 gathers parameters inside a single forward call. Every loss's
maths (CMCL, MLM, LM, MIM, ITM, grounding) lives in model/losses.py; what depends on how the batch is spread
over ranks (gathering CMCL's global columns, ITM's negative sampling) lives here. Gathering features across
ranks is injected as a function, so the same code runs in one process and on many ranks.

ZeRO-3 rule kept throughout: which modules run, and in which order, depends only on the stage's weights (equal
on every rank), never on the data; a batch with nothing to score for a loss still runs that loss's modules and
returns a zero that depends on their outputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import losses
from model.objective_registry import names_of
from model.unimo import UnimoModel, capped_logit_scale

GatherFn = Callable[[Tensor], Tensor]

TEXT_OBJECTIVES = names_of("text")
PAIR_OBJECTIVES = names_of("pair")


def identity_gather(t: Tensor) -> Tensor:
    return t


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0; backward sums every rank's gradient of the gathered tensor, keeps this rank's
    slice.

    The sum (not a mean) is what makes each rank's gradient the gradient of the sum of all ranks' losses; the
    data-parallel mean over ranks then gives the gradient of the global mean loss, as one process would.
    """

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        import torch.distributed as dist

        ctx.rank, ctx.world, ctx.rows = dist.get_rank(), dist.get_world_size(), t.shape[0]
        parts = [torch.empty_like(t) for _ in range(ctx.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=0)  # (W*B, ...)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def autograd_all_gather(t: Tensor) -> Tensor:
    """All-gathers along dim 0 with gradients flowing back to every rank's own slice (equal B on every
    rank)."""
    return _AllGatherWithGrad.apply(t)


# ----------------------------------------------------------------------------------------- ITM negatives

def sample_negatives(sim: Tensor, same: Tensor,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """One column per row drawn from softmax(sim) with same-image columns excluded (ALBEF's hard negatives).

    sim (R, C) scaled similarities, same (R, C) bool -> (index (R,), valid (R,)). A row whose every column
    shows its own image gets an arbitrary column and valid=False, so the caller drops its loss but still runs
    the same modules (ZeRO-3).
    """
    with torch.no_grad():
        logits = sim.float().masked_fill(same, float("-inf"))
        valid = ~same.all(dim=1)
        logits = torch.where(valid[:, None], logits, torch.zeros_like(logits))
        probs = logits.softmax(dim=1)
        idx = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return idx, valid


def phrase_masks(phrase_ids: Tensor) -> Tensor:
    """(B, L) ids (0 = none, k+1 = k-th phrase) -> (B, P, L) bool, P >= 1 so shapes never collapse to
    empty."""
    P = max(int(phrase_ids.max()) if phrase_ids.numel() else 0, 1)
    ks = torch.arange(1, P + 1, device=phrase_ids.device)
    return phrase_ids[:, None, :] == ks[None, :, None]


# ----------------------------------------------------------------------------------------------- module

def _rows(states: list[Tensor], idx: Tensor | slice) -> list[Tensor]:
    return [s[idx] for s in states]


def _cat_rows(blocks: list[list[Tensor]]) -> list[Tensor]:
    """Per-layer states of several row blocks -> per-layer states of all rows, block after block."""
    return [torch.cat(layer) for layer in zip(*blocks)]


class PretrainObjectives(nn.Module):
    """Computes the weighted objectives of one stage on one mixed micro-batch.

    rank / world_size / gather describe the data-parallel group (passed in, never read from the environment).
    """

    def __init__(self, model: UnimoModel, rank: int = 0, world_size: int = 1, gather: GatherFn | None = None):
        super().__init__()
        self.model = model
        self.rank = rank
        self.world_size = world_size
        self.gather = gather or (identity_gather if world_size == 1 else autograd_all_gather)

    def forward(self, batch: dict, weights: dict[str, float]) -> tuple[Tensor, dict[str, Tensor]]:
        active = {k for k, w in weights.items() if w > 0}  # from the config: the same on every rank
        pair_parts: dict[str, Tensor] = {}
        riders: dict[str, list[Tensor] | None] = {}
        if active & set(PAIR_OBJECTIVES):
            # Unpaired MLM texts and MIM images ride along in the pairs' encoder calls (_encode_pair_texts and
            # _encode_pair_images): which rows join depends only on the weights and the config's sizes, so
            # every rank runs the same modules in the same order.
            text = batch["text"] if "mlm_text" in active else None
            image = batch["image"] if "mim" in active else None
            pair_parts, riders = self._pair_objectives(batch["pair"], active, text, image)
        parts: dict[str, Tensor] = {}
        if active & set(TEXT_OBJECTIVES):
            parts.update(self._text_objectives(batch["text"], active, riders.get("text")))
        if "mim" in active:
            parts["mim"] = self._mim(batch["image"], riders.get("image"))
        parts.update(pair_parts)
        total = sum(weights[name] * loss for name, loss in parts.items())
        return total, parts

    # ----- unpaired text and images -------------------------------------------------------------------------
    def _text_objectives(self, text: dict, active: set[str], mlm_states: list[Tensor] | None = None
                         ) -> dict[str, Tensor]:
        """mlm_states: the MLM rows' states when they were encoded along with the pairs' texts."""
        out = {}
        if "mlm_text" in active:
            if mlm_states is None:
                mlm_states = self.model.encode_text(text["mlm_input_ids"], text["attention_mask"])
            out["mlm_text"] = losses.mlm_loss(self.model.mlm_logits_text(mlm_states[-1]), text["mlm_labels"])
        if "lm_text" in active:
            ids, mask = text["input_ids"], text["attention_mask"]
            prefix = _prefix_lengths(mask)
            states = self.model.encode_text(ids, mask, mask_mode="prefix", prefix_len=prefix)
            labels = _lm_labels(ids, mask, prefix)
            out["lm_text"] = losses.lm_loss(self.model.mlm_logits_text(states[-1]), labels)
        return out

    def _mim(self, image: dict, states: list[Tensor] | None = None) -> Tensor:
        """states: the images' states when they were encoded along with the pairs' images."""
        if states is None:
            states = self.model.encode_image(image["pixels"], image["patch_mask"])
        pred = self.model.mim_predict(states[-1])
        return losses.mim_loss(pred, image["pixels"], image["patch_mask"], self.model.cfg.vision.patch_size)

    # ----- pairs --------------------------------------------------------------------------------------------
    def _pair_objectives(self, pair: dict, active: set[str], text: dict | None = None,
                         image: dict | None = None
                         ) -> tuple[dict[str, Tensor], dict[str, list[Tensor] | None]]:
        """The pair losses, and the per-layer states of the unpaired rows that rode along ("text", "image";
        None for rows that did not)."""
        out: dict[str, Tensor] = {}
        riders: dict[str, list[Tensor] | None] = {}
        B = pair["input_ids"].shape[0]
        image_states, riders["image"] = self._encode_pair_images(pair, image)
        text_states, masked_states, feats, riders["text"] = self._encode_pair_texts(pair, image_states,
                                                                                    active, text)
        if "itc" in active:
            out["itc"] = self._cmcl(pair, *feats)
        if active & {"itm", "grounding", "mlm_pair"}:
            txt, img = (feats[0][:B], feats[3]) if feats[0] is not None else (None, None)
            out.update(self._fused_objectives(pair, text_states, masked_states, image_states, txt, img,
                                              active))
        if "caption" in active:
            out["caption"] = self._caption(pair, image_states)
        return out, riders

    def _encode_pair_images(self, pair: dict, image: dict | None) -> tuple[list[Tensor], list[Tensor] | None]:
        """The pairs' images, and the MIM images (patches masked) when given, in ONE vision-encoder call.

        -> (pair states per layer (B, 1+N, Dv), MIM states per layer or None). Under ZeRO-3 each module call
        costs Python hooks, and one call over more rows also makes larger matrix products.
        """
        if image is None or image["pixels"].shape[1:] != pair["pixels"].shape[1:]:
            # sizes come from the config (data.image_size), so this choice is the same on every rank
            return self.model.encode_image(pair["pixels"]), None
        B = pair["pixels"].shape[0]
        unmasked = torch.zeros(B, image["patch_mask"].shape[1], dtype=torch.bool,
                               device=pair["pixels"].device)
        states = self.model.encode_image(torch.cat([pair["pixels"], image["pixels"]]),
                                         torch.cat([unmasked, image["patch_mask"].bool()]))
        return _rows(states, slice(0, B)), _rows(states, slice(B, None))

    def _encode_pair_texts(self, pair: dict, image_states: list[Tensor], active: set[str],
                           text: dict | None = None):
        """Captions, and for CMCL the extra positives and rewrites, for MLM the masked captions, and the
        unpaired MLM texts when given, in ONE text-encoder call: one set of larger matrix products, and under
        ZeRO-3 one set of per-module hooks.

        -> (caption states per layer (B, L, Dt), masked-caption states per layer or None, (caption+positive
        feats (2B, E), their image ids (2B,), rewrite feats (B, 1, E), image feats (B, E)), unpaired MLM
        states per layer (Bt, Lt, Dt) or None); the features are None when neither ITC, ITM nor grounding
        needs them.
        """
        B = pair["input_ids"].shape[0]
        ids, mask = [pair["input_ids"]], [pair["attention_mask"]]
        if "itc" in active:
            ids += [pair["pos_input_ids"], pair["neg_input_ids"]]
            mask += [pair["pos_attention_mask"], pair["neg_attention_mask"]]
        n_feat = B * len(ids)  # rows that ITC features are taken from
        if "mlm_pair" in active:
            ids.append(pair["mlm_input_ids"])
            mask.append(pair["attention_mask"])
        n_pair = B * len(ids)
        if text is not None:
            ids.append(text["mlm_input_ids"])
            mask.append(text["attention_mask"])
        states = self.model.encode_text(*_pad_cat(ids, mask, self.model.cfg.text.pad_token_id))
        riders = None
        if text is not None:
            # (Bt, Lt, Dt)
            riders = _columns(_rows(states, slice(n_pair, None)), text["mlm_input_ids"].shape[1])
        # per layer (kB, L, Dt)
        states = _columns(_rows(states, slice(0, n_pair)), pair["input_ids"].shape[1])
        masked = _rows(states, slice(n_feat, n_pair)) if "mlm_pair" in active else None
        if not active & {"itc", "itm", "grounding"}:
            return _rows(states, slice(0, B)), masked, (None, None, None, None), riders
        txt, img = self.model.itc_features(_rows(states, slice(0, n_feat)), image_states)  # (nB, E), (B, E)
        owner = torch.cat([pair["image_ids"], pair["image_ids"]])  # captions then extra positives
        feats = (txt[:2 * B], owner, txt[2 * B:, None, :], img)
        return _rows(states, slice(0, B)), masked, feats, riders

    def _cmcl(self, pair: dict, txt: Tensor, owner: Tensor, neg: Tensor, img: Tensor) -> Tensor:
        B = img.shape[0]
        # gather captions and positives separately: every rank's tensors must have equal shapes
        txt_all = torch.cat([self.gather(txt[:B]), self.gather(txt[B:])])  # (2*W*B, E)
        owner_all = torch.cat([self.gather(owner[:B]), self.gather(owner[B:])])
        img_all, ids_all = self.gather(img), self.gather(pair["image_ids"])
        neg_valid = (pair["neg_kind"] >= 0)[:, None]  # (B, 1)
        return losses.cmcl_loss(txt, owner, img, pair["image_ids"], txt_all, owner_all, img_all, ids_all, neg,
                                neg_valid, self._scale())

    def _scale(self) -> Tensor:
        # logit_scale is read here, outside UnimoModel.forward: trainer/zero3_external_params.py registers it
        # for ZeRO-3
        return capped_logit_scale(self.model.logit_scale, self.model.cfg.max_logit_scale)

    def _fused_objectives(self, pair: dict, text_states: list[Tensor], masked_states: list[Tensor] | None,
                          image_states: list[Tensor], txt: Tensor | None, img: Tensor | None,
                          active: set[str]) -> dict[str, Tensor]:
        """ITM, grounding and image-conditioned MLM from ONE fusion call over the rows each needs:
        [positives; text + hard-negative image; hard-negative text + image] for ITM (grounding reads the first
        two blocks: the same text against its image and against a look-alike), then [masked text + image]."""
        B, mask = pair["attention_mask"].shape[0], pair["attention_mask"]
        t_blocks, v_blocks, masks = [], [], []
        if active & {"itm", "grounding"}:
            ids = pair["image_ids"]
            same = ids[:, None] == ids[None, :]  # (B, B) columns showing the row's own image
            # (B texts, B images)
            sim = self._scale().detach() * txt.detach().float() @ img.detach().float().t()
            neg_img, img_ok = sample_negatives(sim, same)  # per text, a hard-negative image
            neg_txt, txt_ok = sample_negatives(sim.t(), same)  # per image, a hard-negative text
            t_blocks += [text_states, text_states, _rows(text_states, neg_txt)]
            v_blocks += [image_states, _rows(image_states, neg_img), image_states]
            masks += [mask, mask, mask[neg_txt]]
        if "mlm_pair" in active:
            t_blocks.append(masked_states)
            v_blocks.append(image_states)
            masks.append(mask)
        t_fused, v_fused = self.model.fuse(_cat_rows(t_blocks), torch.cat(masks), _cat_rows(v_blocks))
        out = {}
        if "itm" in active:
            logits = self.model.itm_logits(t_fused[:3 * B], v_fused[:3 * B])  # (3B, 2)
            labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(logits.device)
            keep = torch.cat([torch.ones_like(img_ok), img_ok, txt_ok])
            out["itm"] = losses.itm_loss(logits, labels, keep)
        if "grounding" in active:
            scores = self.model.grounding_scores(t_fused[:2 * B], v_fused[:2 * B])  # (2B, L, N)
            out["grounding"] = losses.grounding_contrast(scores[:B], scores[B:],
                                                         phrase_masks(pair["phrase_ids"]), img_ok)
        if "mlm_pair" in active:
            out["mlm_pair"] = losses.mlm_loss(self.model.mlm_logits_fused(t_fused[-B:]), pair["mlm_labels"])
        return out

    def _caption(self, pair: dict, image_states: list[Tensor]) -> Tensor:
        """Captioning LM: causal unimodal and fused text streams reading the image; predicts every next
        token."""
        ids, mask = pair["input_ids"], pair["attention_mask"]
        states = self.model.encode_text(ids, mask, mask_mode="causal")
        t_fused, _ = self.model.fuse(states, mask, image_states, text_causal=True)
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, losses.IGNORE_INDEX))
        return losses.lm_loss(self.model.lm_logits_fused(t_fused), labels)


def _columns(states: list[Tensor], length: int) -> list[Tensor]:
    """Per-layer (B, L', D) states cut back to their block's own length (contiguous: later code views
    them)."""
    return [s if s.shape[1] == length else s[:, :length].contiguous() for s in states]


def _pad_cat(ids: list[Tensor], masks: list[Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    """Row blocks of token ids and masks -> one (sum B, max L) batch; shorter blocks padded (masked out)."""
    L = max(t.shape[1] for t in ids)
    ids = [F.pad(t, (0, L - t.shape[1]), value=pad_id) for t in ids]
    masks = [F.pad(m, (0, L - m.shape[1]), value=0) for m in masks]
    return torch.cat(ids), torch.cat(masks)


def _prefix_lengths(mask: Tensor) -> Tensor:
    """Half of each sequence's real tokens (at least 1) is the bidirectional prefix."""
    lengths = mask.sum(dim=1)  # (B,)
    return torch.clamp(lengths // 2, min=1)


def _lm_labels(ids: Tensor, mask: Tensor, prefix: Tensor) -> Tensor:
    """Labels for the generated part only: prefix tokens and padding are ignored (-100)."""
    positions = torch.arange(ids.shape[1], device=ids.device)[None, :]  # (1, L)
    keep = (positions >= prefix[:, None]) & mask.bool()
    return torch.where(keep, ids, torch.full_like(ids, -100))
