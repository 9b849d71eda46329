"""layers.whole_units: the modules a sharded trainer gathers at once (ZeRO-3 leaf modules) really run whole:
under every objective, with activation checkpointing off and on, nothing inside a unit runs or is read
outside the unit's own forward, and every unit runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.flavors import get_flavor
from model.layers import whole_units
from model.unimo import UnimoModel
from tests.trainer.test_objectives import ALL, make_batch
from trainer.objectives import PretrainObjectives
from trainer.zero3_external_params import _ReadTracker

UNIT_CLASSES = {"PostLNBlock", "PreLNBlock", "CoAttentionLayer", "TextEmbeddings", "PatchEmbeddings",
                "LevelProjections", "LevelMixer", "CrossLevelMemory", "TiedLMHead", "ITMHead", "MIMHead",
                "GroundingHead"}


def _model(checkpointing: bool) -> UnimoModel:
    cfg = get_flavor("debug")
    cfg.text.bos_token_id, cfg.text.eos_token_id, cfg.text.mask_token_id = 2, 3, 4
    cfg.activation_checkpointing = checkpointing
    torch.manual_seed(0)
    return UnimoModel(cfg)


def _train_step(objectives: nn.Module) -> None:
    """Forward and backward (where checkpointing re-runs blocks) of every objective."""
    total, _ = objectives(make_batch(), ALL)
    total.backward()


def _escapes(objectives: nn.Module, units: list[nn.Module],
             work=_train_step) -> tuple[set[str], set[str], set[str]]:
    """Runs ``work(objectives)``: (modules run outside the unit holding them, parameters read outside every
    unit holding them, units that ran)."""
    names = {id(m): n for n, m in objectives.named_modules()}
    holders: dict[int, list[int]] = {}  # module -> the units it lies inside
    owners: dict[int, set[int]] = {}  # parameter -> the units holding it (a tied weight: several)
    for unit in units:
        for inner in unit.modules():
            if inner is not unit:
                holders.setdefault(id(inner), []).append(id(unit))
        for p in unit.parameters():
            owners.setdefault(id(p), set()).add(id(unit))
    running: list[int] = []
    outside: set[str] = set()
    ran: set[str] = set()

    def enter(module, args) -> None:
        outside.update(names[id(module)] for u in holders.get(id(module), []) if u not in running)
        ran.add(names[id(module)])
        running.append(id(module))

    def leave(module, args, output) -> None:
        running.pop()

    handles = [h for m in objectives.modules()
               for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    params = {id(p): n for n, p in objectives.named_parameters(remove_duplicate=False)}
    tracker = _ReadTracker(owners, params, running)
    try:
        with tracker:
            work(objectives)
    finally:
        for h in handles:
            h.remove()
    return outside, tracker.outside, {names[id(u)] for u in units} & ran


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_every_whole_unit_runs_whole_under_every_objective(checkpointing):
    model = _model(checkpointing)
    units = whole_units(model)
    assert {type(u).__name__ for u in units} == UNIT_CLASSES
    objectives = PretrainObjectives(model)
    modules_outside, params_outside, ran = _escapes(objectives, units)
    assert modules_outside == set() and params_outside == set()
    assert ran == {n for n, m in objectives.named_modules() if m in units}  # every unit was exercised


def test_evaluation_and_generation_keep_every_unit_whole():
    """What else runs under the ZeRO-3 engine: retrieval with ITM re-ranking, sample captions (beam search),
    a text continuation, text features (trainer/evaluation.py, model/generate.py)."""
    from model.generate import generate
    from tests.trainer.test_evaluation import make_eval_set
    from trainer.evaluation import encode_texts, evaluate

    model = _model(False).eval()
    eval_set = make_eval_set()

    def work(objectives: nn.Module) -> None:
        with torch.no_grad():
            evaluate(objectives.model, eval_set, rerank_k=2, caption_images=2)
            generate(objectives.model, input_ids=eval_set["input_ids"][:2, :4], max_new_tokens=3, num_beams=2)
            encode_texts(objectives.model, eval_set["input_ids"][:4], eval_set["attention_mask"][:4])

    modules_outside, params_outside, ran = _escapes(PretrainObjectives(model), whole_units(model), work)
    assert modules_outside == set() and params_outside == set()
    assert {"model.itm_head", "model.lm_fused_head", "model.text.embeddings"} <= ran


def test_the_check_catches_a_module_whose_children_are_called_without_it():
    """The fusion encoder calls each FusionLayer's two streams directly, never the layer itself: taken for a
    unit, its streams run outside it (a ZeRO-3 leaf module there would never gather its parameters)."""
    model = _model(False)
    layers = [m for m in model.modules() if type(m).__name__ == "FusionLayer"]
    modules_outside, params_outside, ran = _escapes(PretrainObjectives(model), layers)
    assert {n.rsplit(".", 1)[-1] for n in modules_outside} >= {"text", "image"}
    assert params_outside and ran == set()
