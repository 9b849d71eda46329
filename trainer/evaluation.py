"""Evaluation during training: image<->text retrieval on held-out pairs by ITC similarity."""

from __future__ import annotations

import torch

from model.unimo import UnimoModel


def recall_at_k(sim: torch.Tensor, positives: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[int, float]:
    """sim (Q, C), positives (Q, C) bool -> {k: fraction of queries whose best positive ranks in the top k}."""
    best_pos = sim.masked_fill(~positives, float("-inf")).max(dim=1).values  # (Q,)
    ranks = (sim > best_pos[:, None]).sum(dim=1)  # (Q,) candidates scored above the best positive
    return {k: float((ranks < k).float().mean()) for k in ks}


@torch.no_grad()
def encode_eval_set(model: UnimoModel, eval_set: dict, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """ITC features of every text (T, E) and every image (N, E) of the held-out set."""
    was_training = model.training
    model.eval()
    txt_feats, img_feats = [], []
    ids, mask, pixels = eval_set["input_ids"], eval_set["attention_mask"], eval_set["pixels"]
    # Texts and images go through the encoders together (same number of batches on every rank, same modules)
    # so that ZeRO-3's parameter gathers line up; a dummy pixel batch fills in once the images run out.
    n_text, n_img = ids.shape[0], pixels.shape[0]
    for i in range(0, max(n_text, n_img), batch_size):
        t_ids, t_mask = ids[i:i + batch_size], mask[i:i + batch_size]
        px = pixels[i:i + batch_size]
        if t_ids.shape[0] == 0:
            t_ids, t_mask = ids[:1], mask[:1]
        if px.shape[0] == 0:
            px = pixels[:1]
        txt, img = model.itc_features(model.encode_text(t_ids, t_mask), model.encode_image(px))
        if i < n_text:
            txt_feats.append(txt.float())
        if i < n_img:
            img_feats.append(img.float())
    model.train(was_training)
    return torch.cat(txt_feats), torch.cat(img_feats)


def retrieval_metrics(model: UnimoModel, eval_set: dict) -> dict[str, float]:
    """R@1/5/10 image->text and text->image over the whole held-out set (each image among N, each text among T)."""
    txt, img = encode_eval_set(model, eval_set)
    owner = eval_set["text_image_index"]  # (T,) image row of each caption
    sim = img @ txt.T  # (N, T)
    positives = owner[None, :] == torch.arange(img.shape[0], device=owner.device)[:, None]  # (N, T)
    out = {f"eval/i2t_R@{k}": v for k, v in recall_at_k(sim, positives).items()}
    out.update({f"eval/t2i_R@{k}": v for k, v in recall_at_k(sim.T, positives.T).items()})
    out["eval/candidates"] = float(img.shape[0])
    return out
