"""Evaluation of a model: image<->text retrieval on held-out pairs (ITC, optionally ITM re-ranked), zero-shot
classification from class prompts, sample captions. Used during training and by `unimo eval`.

Every rank runs evaluation (ZeRO-3 gathers need all ranks), so the modules run here and their count depend
only on the held-out set's size and the config, never on scores: the re-ranker scores a fixed k candidates per
query, captioning decodes a fixed number of steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from model.generate import generate
from model.unimo import UnimoModel

CAPTION_IMAGES = 4  # eval images captioned at each evaluation (printed by rank 0)
CAPTION_TOKENS = 16


def recall_at_k(sim: Tensor, positives: Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[int, float]:
    """sim (Q, C), positives (Q, C) bool -> {k: fraction of queries whose best positive ranks in the top
    k}."""
    best_pos = sim.masked_fill(~positives, float("-inf")).max(dim=1).values  # (Q,)
    ranks = (sim > best_pos[:, None]).sum(dim=1)  # (Q,) candidates scored above the best positive
    return {k: float((ranks < k).float().mean()) for k in ks}


@torch.no_grad()
def encode_eval_set(model: UnimoModel, eval_set: dict, batch_size: int = 64,
                    progress: Callable[[int], None] | None = None) -> tuple[Tensor, Tensor]:
    """ITC features of every text (T, E) and every image (N, E) of the held-out set.

    ``progress(n)`` is told after each batch how many texts and images it encoded (progress bars).
    """
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
        if progress is not None:
            progress(min(batch_size, max(n_text - i, 0)) + min(batch_size, max(n_img - i, 0)))
    model.train(was_training)
    return torch.cat(txt_feats), torch.cat(img_feats)


@torch.no_grad()
def itm_scores(model: UnimoModel, eval_set: dict, image_rows: Tensor, text_rows: Tensor,
               batch_size: int = 64, progress: Callable[[int], None] | None = None) -> Tensor:
    """ITM match margin (logit[match] - logit[no match]) of each (image, text) pair: rows (M,) -> (M,)."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, image_rows.shape[0], batch_size):
        im, tx = image_rows[i:i + batch_size], text_rows[i:i + batch_size]
        mask = eval_set["attention_mask"][tx]
        t_states = model.encode_text(eval_set["input_ids"][tx], mask)
        v_states = model.encode_image(eval_set["pixels"][im])
        logits = model.itm_logits(*model.fuse(t_states, mask, v_states)).float()  # (b, 2)
        out.append(logits[:, 1] - logits[:, 0])
        if progress is not None:
            progress(im.shape[0])
    model.train(was_training)
    return torch.cat(out)


def rerank_top_k(sim: Tensor, k: int, score: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """sim (Q, C) -> a copy in which each query's top-k candidates are ordered by ``score`` and stay above the
    rest.

    score(query rows (M,), candidate columns (M,)) -> (M,). Candidates outside the top k keep their ITC order,
    below every re-ranked one, so R@K for K > k still counts them.
    """
    k = min(k, sim.shape[1])
    top = sim.topk(k, dim=1).indices  # (Q, k)
    rows = torch.arange(sim.shape[0], device=sim.device)[:, None].expand_as(top)
    s = score(rows.reshape(-1), top.reshape(-1)).view_as(top).to(sim.dtype)
    out = sim - (sim.max() - s.min() + 1.0)  # every candidate now scores below every re-ranked one
    out[rows, top] = s
    return out


def retrieval_metrics(model: UnimoModel, eval_set: dict, rerank_k: int = 0,
                      progress: Callable[[int], None] | None = None,
                      features: tuple[Tensor, Tensor] | None = None) -> dict[str, float]:
    """R@1/5/10 image->text and text->image over the whole held-out set (each image among N, each text among
    T).

    rerank_k > 0 adds eval/itm_{i2t,t2i}_R@k: the ITC top-k of each query re-ordered by the ITM head.
    ``features``: the set's (text, image) ITC features when already encoded; ``progress(n)`` counts the texts
    and images encoded and the pairs the ITM head scored (retrieval_work gives the total).
    """
    txt, img = features if features is not None else encode_eval_set(model, eval_set, progress=progress)
    sim = img @ txt.T  # (N, T)
    positives = eval_positives(eval_set)
    out = {f"eval/i2t_R@{k}": v for k, v in recall_at_k(sim, positives).items()}
    out.update({f"eval/t2i_R@{k}": v for k, v in recall_at_k(sim.T, positives.T).items()})
    if rerank_k > 0:
        i2t = rerank_top_k(sim, rerank_k,
                           lambda im, tx: itm_scores(model, eval_set, im, tx, progress=progress))
        t2i = rerank_top_k(sim.T, rerank_k,
                           lambda tx, im: itm_scores(model, eval_set, im, tx, progress=progress))
        out.update({f"eval/itm_i2t_R@{k}": v for k, v in recall_at_k(i2t, positives).items()})
        out.update({f"eval/itm_t2i_R@{k}": v for k, v in recall_at_k(t2i, positives.T).items()})
    out["eval/candidates"] = float(len(set(_image_identity(eval_set).tolist())))  # distinct images
    return out


def _image_identity(eval_set: dict) -> Tensor:
    """(N,) which image each image row shows: its id where the set has them, else its row."""
    ids = eval_set.get("image_ids")
    return ids if ids is not None else torch.arange(eval_set["pixels"].shape[0])


def eval_positives(eval_set: dict) -> Tensor:
    """(N images, T captions) bool: the caption describes the image. A held-out set written one sample per
    caption (COCO's five captions as five samples sharing the image's ``id``) holds each image once per
    caption: every row showing the caption's image counts, not only the row it came with (R@1 used to count a
    caption's own image's other copies as wrong answers)."""
    image = _image_identity(eval_set)
    owner = eval_set["text_image_index"]  # (T,) image row of each caption
    return image[owner][None, :] == image[:, None]


def retrieval_work(eval_set: dict, rerank_k: int = 0) -> int:
    """How many progress units retrieval_metrics reports: texts + images encoded, pairs the ITM head
    scores."""
    n_text, n_img = eval_set["input_ids"].shape[0], eval_set["pixels"].shape[0]
    work = n_text + n_img
    if rerank_k > 0:
        work += n_img * min(rerank_k, n_text) + n_text * min(rerank_k, n_img)
    return work


def top_k_accuracy(sim: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """sim (N, C) class scores, labels (N, C) bool (an image may carry several true classes) -> {k: fraction
    of images with a true class among their k best}. Images without any true class must be dropped
    beforehand."""
    out = {}
    for k in ks:
        top = sim.topk(min(k, sim.shape[1]), dim=1).indices  # (N, k)
        out[k] = float(labels.gather(1, top).any(dim=1).float().mean())
    return out


def class_embeddings(prompt_feats: Tensor, prompt_class: Tensor, n_classes: int) -> Tensor:
    """Mean of each class's L2-normalised prompt features, normalised again: (P, E), (P,) -> (C, E)."""
    sums = torch.zeros(n_classes, prompt_feats.shape[1], dtype=prompt_feats.dtype, device=prompt_feats.device)
    sums.index_add_(0, prompt_class, prompt_feats)
    return torch.nn.functional.normalize(sums, dim=-1)


def zero_shot_metrics(image_feats: Tensor, prompt_feats: Tensor, prompt_class: Tensor, labels: Tensor,
                      ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Zero-shot classification by ITC similarity to class prompts.

    image_feats (N, E) and prompt_feats (P, E) are ITC features, prompt_class (P,) the class of each prompt,
    labels (N, C) bool the true classes of each image. Images with no true class are left out and counted.
    """
    classes = class_embeddings(prompt_feats, prompt_class, labels.shape[1])
    keep = labels.any(dim=1)
    out = {"eval/zeroshot_classes": float(labels.shape[1]), "eval/zeroshot_images": float(keep.sum()),
           "eval/zeroshot_unlabelled": float((~keep).sum())}
    if keep.any():
        sim = image_feats[keep] @ classes.T
        out.update({f"eval/zeroshot_top{k}": v for k, v in top_k_accuracy(sim, labels[keep], ks).items()})
    return out


@torch.no_grad()
def encode_texts(model: UnimoModel, input_ids: Tensor, attention_mask: Tensor,
                 batch_size: int = 64) -> Tensor:
    """ITC features (T, E) of tokenised texts (class prompts)."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, input_ids.shape[0], batch_size):
        final = model.encode_text(input_ids[i:i + batch_size], attention_mask[i:i + batch_size])[-1]
        # the text half of UnimoModel.itc_features: projected, normalised final [CLS]
        out.append(torch.nn.functional.normalize(model.text_proj(final[:, 0]), dim=-1).float())
    model.train(was_training)
    return torch.cat(out)


def sample_captions(model: UnimoModel, pixels: Tensor, max_new_tokens: int = CAPTION_TOKENS,
                    decode: Callable[[list[int]], str] | None = None) -> list:
    """Greedy captions of ``pixels`` (B, 3, H, W): token-id lists, or strings when ``decode`` is given.

    Decodes exactly max_new_tokens steps (eos_token_id=-1 never matches, so no early stop that could differ
    between ranks) and cuts each caption at its first real end-of-text token afterwards.
    """
    eos = model.cfg.text.eos_token_id
    ids = generate(model, pixels=pixels, max_new_tokens=max_new_tokens, eos_token_id=-1)  # (B, T)
    out = []
    for row in ids.tolist():
        row = row[:row.index(eos)] if eos in row else row
        out.append(decode(row) if decode else row)
    return out


def evaluate(model: UnimoModel, eval_set: dict, rerank_k: int = 0, caption_images: int = CAPTION_IMAGES,
             decode: Callable[[list[int]], str] | None = None) -> tuple[dict[str, float], list]:
    """Retrieval metrics and sample captions of the first ``caption_images`` held-out images."""
    metrics = retrieval_metrics(model, eval_set, rerank_k)
    n = min(caption_images, eval_set["pixels"].shape[0])
    captions = sample_captions(model, eval_set["pixels"][:n], decode=decode) if n > 0 else []
    return metrics, captions
