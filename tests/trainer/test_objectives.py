"""PretrainObjectives: every objective's loss, ZeRO-3-safe module traffic, CMCL/ITM/grounding maths, no
leaks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.flavors import get_flavor
from model.unimo import UnimoModel
from model.objective_registry import OBJECTIVES
from model.losses import cmcl_loss, grounding_contrast, multi_positive_nce
from trainer.objectives import PretrainObjectives, phrase_masks, sample_negatives
from trainer.zero3_external_params import EXTERNAL_SUFFIXES, external_reads

ALL = {name: 1.0 for name in OBJECTIVES}
VOCAB_LOW = 5  # ids 0..4 are the specials of the synthetic tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed: int = 0) -> UnimoModel:
    cfg = get_flavor("debug")
    cfg.text.bos_token_id, cfg.text.eos_token_id, cfg.text.mask_token_id = 2, 3, 4
    torch.manual_seed(seed)
    return UnimoModel(cfg)


def _texts(g: torch.Generator, B: int, L: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] random tokens [SEP] then padding; lengths vary per row."""
    lengths = torch.randint(4, L + 1, (B,), generator=g)
    ids = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):
        ids[b, :n] = torch.randint(VOCAB_LOW, vocab, (n,), generator=g)
        ids[b, 0], ids[b, n - 1] = 2, 3
        mask[b, :n] = 1
    return ids, mask


def make_batch(B: int = 4, L: int = 12, seed: int = 0, image_ids=None, degenerate: bool = False,
               vocab: int = 1024) -> dict:
    """A mixed micro-batch with every field the loader provides.

    degenerate: nothing to score for the data-dependent losses (no masked token, no masked patch, no phrase,
    no rewrite, one image id for all) -- the batch that must still run every module under ZeRO-3.
    """
    g = torch.Generator().manual_seed(seed)
    text_ids, text_mask = _texts(g, B, L, vocab)
    text_labels = (torch.where(torch.rand(B, L, generator=g) < 0.3, text_ids, -100) * text_mask
                   - 100 * (1 - text_mask))
    ids, mask = _texts(g, B, L, vocab)
    pos_ids, pos_mask = _texts(g, B, L, vocab)
    neg_ids, neg_mask = _texts(g, B, L, vocab)
    labels = torch.where(torch.rand(B, L, generator=g) < 0.3, ids, -100) * mask - 100 * (1 - mask)
    phrase = torch.zeros(B, L, dtype=torch.long)
    phrase[:, 1:3], phrase[:, 4:5] = 1, 2
    phrase = phrase * mask
    if image_ids is None:
        image_ids = torch.arange(B) + 100 * seed
    patch_mask = torch.rand(B, 16, generator=g) < 0.5
    neg_kind = torch.randint(-1, 3, (B,), generator=g)
    if degenerate:
        text_labels = labels = torch.full((B, L), -100)
        patch_mask = torch.zeros(B, 16, dtype=torch.bool)
        phrase = torch.zeros_like(phrase)
        neg_kind = torch.full((B,), -1)
        image_ids = torch.zeros(B, dtype=torch.long)
    pixels = lambda: torch.randn(B, 3, 32, 32, generator=g)
    return {
        "text": {"input_ids": text_ids, "attention_mask": text_mask, "mlm_input_ids": text_ids,
                 "mlm_labels": text_labels},
        "image": {"pixels": pixels(), "patch_mask": patch_mask},
        "pair": {"input_ids": ids, "attention_mask": mask, "mlm_input_ids": ids, "mlm_labels": labels,
                 "pixels": pixels(), "image_ids": torch.as_tensor(image_ids), "pos_input_ids": pos_ids,
                 "pos_attention_mask": pos_mask, "neg_input_ids": neg_ids, "neg_attention_mask": neg_mask,
                 "neg_kind": neg_kind, "phrase_ids": phrase},
    }


def module_trace(objectives: nn.Module, batch: dict, weights: dict) -> list[str]:
    """Names of the modules run by one forward + backward, in call order."""
    names = {m: n for n, m in objectives.named_modules()}
    trace: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: trace.append(names[mod])) for m in names]
    try:
        total, _ = objectives(batch, weights)
        total.backward()
    finally:
        for h in hooks:
            h.remove()
    return trace


# ----------------------------------------------------------------------------------------------- the module

def test_every_objective_has_its_loss_and_every_parameter_learns():
    obj = PretrainObjectives(make_model())
    weights = {name: 0.5 + i for i, name in enumerate(ALL)}
    total, parts = obj(make_batch(), weights)
    assert set(parts) == set(OBJECTIVES)
    for name, loss in parts.items():
        assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0, name
    torch.testing.assert_close(total, sum(weights[k] * v for k, v in parts.items()))
    total.backward()
    no_grad = [n for n, p in obj.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    assert float(obj.model.logit_scale.grad.abs()) > 0  # the learnable temperature is trained by CMCL


def test_zero_weight_objectives_do_not_run():
    obj = PretrainObjectives(make_model())
    _, parts = obj(make_batch(), {"itc": 1.0, "mim": 0.0, "caption": 1.0})
    assert set(parts) == {"itc", "caption"}
    trace = module_trace(obj, make_batch(), {"itc": 1.0})
    assert not any(n.startswith(("model.fusion", "model.itm_head", "model.mim_head")) for n in trace)


def test_same_modules_in_same_order_whatever_the_batch_holds():
    """ZeRO-3: a batch with no phrase, no masked token or patch, no rewrite and one image id for all runs the
    very same modules as a normal batch, with zero (but differentiable) losses where nothing is scored."""
    obj = PretrainObjectives(make_model())
    normal = module_trace(obj, make_batch(seed=1), ALL)
    obj.zero_grad()
    empty = module_trace(obj, make_batch(seed=2, degenerate=True), ALL)
    assert normal == empty
    _, parts = obj(make_batch(seed=2, degenerate=True), ALL)
    for name in ("mlm_text", "mim", "mlm_pair", "grounding"):
        assert parts[name].item() == 0.0 and parts[name].requires_grad, name
    # ITM keeps its positive pairs; one image for all texts: every column is positive, still finite
    assert torch.isfinite(parts["itc"]) and torch.isfinite(parts["itm"])


@pytest.mark.parametrize("text_len", [9, 12, 15])
def test_unpaired_rows_ride_along_in_the_pair_encoder_calls_with_unchanged_losses(text_len):
    """With pair objectives on, the MLM texts and MIM images join the pairs' encoder calls: each encoder runs
    once per step, and their losses equal those of separate calls, whether the unpaired texts are shorter
    than, as long as or longer than the captions (12 tokens)."""
    obj = PretrainObjectives(make_model()).eval()  # no dropout: both ways must give the same numbers
    batch = make_batch(seed=3)
    batch["text"] = make_batch(seed=4, L=text_len)["text"]
    weights = {"mlm_text": 1.0, "mim": 1.0, "itc": 1.0, "itm": 1.0, "mlm_pair": 1.0}
    trace = module_trace(obj, batch, weights)
    assert trace.count("model.text") == 1 and trace.count("model.vision") == 1
    torch.manual_seed(0)  # ITM draws its hard negatives at random: the same draws both ways
    _, parts = obj(batch, weights)
    alone_text = obj._text_objectives(batch["text"], {"mlm_text"})["mlm_text"]
    alone_mim = obj._mim(batch["image"])
    assert parts["mlm_text"] > 0 and parts["mim"] > 0
    torch.testing.assert_close(parts["mlm_text"], alone_text, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["mim"], alone_mim, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    # riders leave the pair losses alone
    _, pairs_only = obj(batch, {"itc": 1.0, "itm": 1.0, "mlm_pair": 1.0})
    for name in ("itc", "itm", "mlm_pair"):
        torch.testing.assert_close(parts[name], pairs_only[name], rtol=1e-5, atol=1e-6)


def test_parameters_read_outside_their_module_are_registered_for_zero3():
    obj = PretrainObjectives(make_model())
    batch = make_batch()
    outside = external_reads(obj, lambda: obj(batch, ALL))
    assert "model.logit_scale" in outside
    unregistered = sorted(n for n in outside if not n.endswith(EXTERNAL_SUFFIXES))
    assert unregistered == []


def test_external_read_detector_sees_a_parent_reading_a_child_weight():
    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.child = nn.Linear(3, 3)
            self.own = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.child(x) * self.own + self.child.bias  # bias read outside the child's forward

    p = Parent()
    assert external_reads(p, lambda: p(torch.ones(2, 3))) == {"child.bias"}


# --------------------------------------------------------------------------------------------- leak checks

def test_prefix_lm_sees_no_future_token():
    obj = PretrainObjectives(make_model())
    text = make_batch(B=2, L=12)["text"]
    ids, mask = text["input_ids"].clone(), torch.ones_like(text["input_ids"])
    prefix = torch.tensor([4, 6])
    logits = lambda x: obj.model.mlm_logits_text(
        obj.model.encode_text(x, mask, mask_mode="prefix", prefix_len=prefix)[-1])
    base = logits(ids)
    j = 8  # a generated (non-prefix) position of both rows
    changed = ids.clone()
    changed[:, j] = (changed[:, j] + 1 - VOCAB_LOW) % (1024 - VOCAB_LOW) + VOCAB_LOW
    after = logits(changed)
    torch.testing.assert_close(after[:, :j], base[:, :j])  # nothing before j saw token j
    assert not torch.allclose(after[:, j:], base[:, j:])
    from trainer.objectives import _lm_labels

    labels = _lm_labels(ids, mask, prefix)
    assert (labels[0, :4] == -100).all() and (labels[0, 4:] == ids[0, 4:]).all()


def test_caption_stream_sees_no_future_token_but_sees_the_image():
    obj = PretrainObjectives(make_model())
    pair = make_batch(B=2, L=10)["pair"]
    ids, mask = pair["input_ids"], torch.ones_like(pair["input_ids"])
    image = obj.model.encode_image(pair["pixels"])

    def logits(x, img):
        t, _ = obj.model.fuse(obj.model.encode_text(x, mask, mask_mode="causal"), mask, img, text_causal=True)
        return obj.model.lm_logits_fused(t)

    base = logits(ids, image)
    changed = ids.clone()
    changed[:, 6] = VOCAB_LOW + 7
    torch.testing.assert_close(logits(changed, image)[:, :6], base[:, :6])
    other = obj.model.encode_image(pair["pixels"].flip(0))
    assert not torch.allclose(logits(ids, other)[:, 0], base[:, 0])


# ------------------------------------------------------------------------------------------------ CMCL maths

def _unit(n, e=8, seed=0):
    return F.normalize(torch.randn(n, e, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_cmcl_equals_a_row_by_row_reference():
    B, E = 3, 8
    caps, pos, img, neg = _unit(B, E, 1), _unit(B, E, 2), _unit(B, E, 3), _unit(B, E, 4)[:, None]
    ids = torch.tensor([7, 8, 7])  # rows 0 and 2 show the same image: each other's positives
    txt, owner = torch.cat([caps, pos]), torch.cat([ids, ids])
    valid = torch.tensor([[True], [False], [True]])
    scale = torch.tensor(5.0)
    got = cmcl_loss(txt, owner, img, ids, txt, owner, img, ids, neg, valid, scale)
    t2i, i2t = [], []
    for r in range(2 * B):
        logits = scale * img @ txt[r]
        positive = ids == owner[r]
        t2i.append(-(logits[positive].exp().sum() / logits.exp().sum()).log())
    for i in range(B):
        logits = scale * txt @ img[i]
        if valid[i, 0]:
            logits = torch.cat([logits, scale * neg[i] @ img[i]])
        positive = torch.cat([owner == ids[i], torch.zeros(len(logits) - 2 * B, dtype=torch.bool)])
        i2t.append(-(logits[positive].exp().sum() / logits.exp().sum()).log())
    torch.testing.assert_close(got, 0.5 * (torch.stack(t2i).mean() + torch.stack(i2t).mean()))


def test_cmcl_hard_negative_raises_the_loss_only_when_valid():
    B = 4
    txt, img = _unit(2 * B, seed=1), _unit(B, seed=2)
    ids = torch.arange(B)
    owner = torch.cat([ids, ids])
    hard = img[:, None].clone()  # a rewrite as close to the image as can be
    s = torch.tensor(10.0)
    args = (txt, owner, img, ids, txt, owner, img, ids, hard)
    off = cmcl_loss(*args, torch.zeros(B, 1, dtype=torch.bool), s)
    on = cmcl_loss(*args, torch.ones(B, 1, dtype=torch.bool), s)
    assert on > off + 0.1


def test_multi_positive_nce_is_zero_when_every_column_is_positive():
    logits = torch.randn(3, 5)
    assert multi_positive_nce(logits, torch.ones(3, 5, dtype=torch.bool)).abs() < 1e-6
    one = torch.zeros(3, 5, dtype=torch.bool)
    one[:, 0] = True
    torch.testing.assert_close(multi_positive_nce(logits, one),
                               F.cross_entropy(logits, torch.zeros(3).long()))


# ------------------------------------------------------------------------------------------- ITM, grounding

def test_itm_negatives_come_from_similar_other_images():
    sim = torch.tensor([[9.0, 8.0, -9.0], [8.0, 9.0, -9.0], [0.0, 0.0, 0.0]]) * 3
    same = torch.eye(3, dtype=torch.bool)
    same[2] = True  # row 2: every column shows its own image -> no valid negative
    g = torch.Generator().manual_seed(0)
    picks = torch.stack([sample_negatives(sim, same, g)[0] for _ in range(200)])  # (200, 3)
    _, valid = sample_negatives(sim, same, g)
    assert valid.tolist() == [True, True, False]
    assert (picks[:, 0] == 1).all() and (picks[:, 1] == 0).all()  # the most similar other image, never itself


def test_grounding_prefers_the_image_where_the_phrase_lights_a_patch():
    B, L, N = 2, 5, 4
    pos, neg = torch.zeros(B, L, N), torch.zeros(B, L, N)
    pos[:, 1, 2] = 6.0  # phrase token 1 matches patch 2 of the paired image
    phrase_ids = torch.zeros(B, L, dtype=torch.long)
    phrase_ids[:, 1:3] = 1
    masks = phrase_masks(phrase_ids)
    ok = torch.ones(B, dtype=torch.bool)
    right, wrong = grounding_contrast(pos, neg, masks, ok), grounding_contrast(neg, pos, masks, ok)
    assert right < math.log(2) < wrong
    assert grounding_contrast(pos, neg, masks, torch.zeros(B, dtype=torch.bool)).item() == 0.0
    assert phrase_masks(torch.zeros(B, L, dtype=torch.long)).shape == (B, 1, L)  # never an empty phrase axis


def test_itm_drops_rows_without_a_valid_negative():
    """With one image id for the whole batch no negative exists; ITM must not learn 'positive = negative'."""
    obj = PretrainObjectives(make_model())
    batch = make_batch(image_ids=torch.zeros(4, dtype=torch.long))
    _, parts = obj(batch, {"itm": 1.0})
    positives_only = F.cross_entropy(
        obj.model.itm_logits(*obj.model.fuse(obj.model.encode_text(batch["pair"]["input_ids"],
                                                                   batch["pair"]["attention_mask"]),
                                             batch["pair"]["attention_mask"],
                                             obj.model.encode_image(batch["pair"]["pixels"]))),
        torch.ones(4, dtype=torch.long))
    torch.testing.assert_close(parts["itm"], positives_only)


@pytest.mark.parametrize("mode", ["none", "bridge", "gated"])
def test_all_objectives_run_in_every_cross_layer_mode(mode):
    cfg = get_flavor("debug")
    cfg.fusion.cross_layer = mode
    obj = PretrainObjectives(UnimoModel(cfg))
    total, parts = obj(make_batch(), ALL)
    total.backward()
    assert set(parts) == set(ALL) and torch.isfinite(total)
