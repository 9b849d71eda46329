"""Stage-0 checkpoints (no ZeRO: the whole model and the torch optimizer's state in one file) to and from
DeepSpeed's universal format, so that a run saved without ZeRO resumes under any stage or world size and back.

``deepspeed.zero_stage: auto`` picks stage 0 for a one-rank job (trainer/zero_stage.py): on one rank ZeRO
partitions nothing and its flat buffers only cost host work. DeepSpeed's own converter (ds_to_universal) reads
only ZeRO layouts and its universal load only fills ZeRO optimizers, so both directions are done here:

- ``stage0_to_universal``: the universal folder a ZeRO-1 conversion would write (zero/<name>/fp32.pt,
  exp_avg.pt, exp_avg_sq.pt, step.pt, zero/optimizer_state.pt, the model-states file) from the stage-0 file.
  The optimizer's state is indexed by position; which parameter each position is comes from the names the
  save recorded (``PARAM_NAMES_KEY``, written by ``param_names_by_group`` into the checkpoint).
- ``load_universal_into_plain``: a universal folder (from any stage, or from the function above) into a
  stage-0 engine: each weight from its fp32 copy, Adam's moments and step into the torch optimizer, the
  buffers and DeepSpeed's step counters from the model-states file. The optimizer's group settings stay this
  run's (they come from its config; the learning rate is set every step).

Only DeepSpeed's plain path is covered: fp32 and ``autocast`` precision, where the engine's optimizer is the
torch optimizer itself. Under ``bf16`` DeepSpeed wraps it in its BF16 optimizer with a layout of its own, so
``auto`` does not pick stage 0 there.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

MODEL_STATES = "mp_rank_00_model_states.pt"
# The checkpoint key (DeepSpeed's client state) naming each optimizer position: a list per parameter group.
PARAM_NAMES_KEY = "unimo_param_names"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def param_names_by_group(engine: Any) -> dict[str, list[list[str]]]:
    """The client state a stage-0 save adds: each optimizer group's parameters by name, in the group's
    order (the torch optimizer's state dict numbers them in that order)."""
    names = {id(p): name for name, p in engine.module.named_parameters()}
    groups = [[names.get(id(p)) for p in group["params"]] for group in engine.optimizer.param_groups]
    if any(None in group for group in groups):  # a wrapper's own copies (bf16): not the plain layout
        return {}
    return {PARAM_NAMES_KEY: groups}


def _positions(saved: dict) -> dict[int, str]:
    """{optimizer position: parameter name} of a stage-0 model-states file."""
    groups = saved.get(PARAM_NAMES_KEY)
    if groups is None:
        raise ValueError("this stage-0 checkpoint does not name its optimizer's parameters (it was written "
                         "before unimo recorded them, or under DeepSpeed's bf16 precision, whose optimizer "
                         "keeps copies of its own), so it can resume only under stage 0 with its own "
                         "precision; set deepspeed.zero_stage=0 to resume it")
    positions: dict[int, str] = {}
    for group, names in zip(saved["optimizer"]["param_groups"], groups):
        if len(group["params"]) != len(names):
            raise ValueError(f"stage-0 checkpoint: an optimizer group of {len(group['params'])} parameters "
                             f"names {len(names)}")
        positions.update(zip(group["params"], names))
    return positions


def stage0_to_universal(src_tag_dir: Path, out_tag_dir: Path) -> None:
    """Writes the universal form of the stage-0 checkpoint folder ``src_tag_dir`` into ``out_tag_dir``."""
    from importlib.metadata import version

    saved = torch.load(Path(src_tag_dir) / MODEL_STATES, map_location="cpu", weights_only=False)
    positions = _positions(saved)
    weights, state = saved["module"], saved["optimizer"]["state"]
    zero = Path(out_tag_dir) / "zero"
    zero.mkdir(parents=True, exist_ok=True)
    for group in saved["optimizer"]["param_groups"]:
        # A parameter torch's AdamW never stepped (no gradient yet: a head whose objective has not trained)
        # has no state. A ZeRO optimizer keeps one flat state per group, zero moments included, and its
        # universal load wants one step for a whole group: such a parameter gets zero moments and the group's
        # step.
        stepped = [state[i]["step"] for i in group["params"] if i in state]
        group_step = max(stepped, key=float) if stepped else None  # ZeRO counts steps per group
        for index in group["params"]:
            name = positions[index]
            folder = zero / name
            folder.mkdir(exist_ok=True)
            # the fp32 copy: stage 0 trains the module's own fp32 weights (fp32 and autocast precision)
            weight = weights[name].detach().float()
            torch.save({"param": weight.clone()}, folder / "fp32.pt")
            if group_step is None:  # nothing in the group trained yet: no optimizer state to carry
                continue
            moments = state.get(index) or {key: torch.zeros_like(weight) for key in ADAM_KEYS}
            for key in ADAM_KEYS:
                torch.save({"param": moments[key].clone()}, folder / f"{key}.pt")
            torch.save(group_step.clone() if torch.is_tensor(group_step) else group_step, folder / "step.pt")
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [0]}
              for g in saved["optimizer"]["param_groups"]]
    torch.save({"param_groups": groups, "ds_version": version("deepspeed")}, zero / "optimizer_state.pt")
    # the model-states file without the optimizer (now under zero/), as a ZeRO conversion keeps its own
    lean = {k: v for k, v in saved.items() if k not in ("optimizer", PARAM_NAMES_KEY)}
    lean["optimizer"] = None
    torch.save(lean, Path(out_tag_dir) / MODEL_STATES)
    log.info("stage-0 checkpoint %s written in universal form (%d parameters)", src_tag_dir, len(positions))


def load_universal_into_plain(engine: Any, tag_dir: Path) -> None:
    """Loads the universal folder ``tag_dir`` into a stage-0 engine (its optimizer the torch optimizer)."""
    tag_dir = Path(tag_dir)
    zero = tag_dir / "zero"
    optimizer = engine.optimizer
    if optimizer is not getattr(engine, "basic_optimizer", optimizer):
        raise ValueError(f"cannot resume {tag_dir} under stage 0 with DeepSpeed's {type(optimizer).__name__} "
                         "(bf16 precision keeps fp32 master weights of its own): set deepspeed.zero_stage=1, "
                         "or deepspeed.precision=autocast")
    group_of = {p: g for g in optimizer.param_groups for p in g["params"]}
    params = dict(engine.module.named_parameters())
    missing = [name for name in params if not (zero / name / "fp32.pt").is_file()]
    if missing:
        raise ValueError(f"universal checkpoint {tag_dir} lacks {len(missing)} of this model's weights, "
                         f"e.g. {missing[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            folder = zero / name
            p.copy_(_tensor(folder / "fp32.pt").view_as(p))
            if not (folder / "exp_avg.pt").is_file():
                optimizer.state.pop(p, None)
                continue
            step = float(torch.load(folder / "step.pt", weights_only=False))
            group = group_of[p]
            # each parameter its own step tensor (the fused AdamW increments it in place), where torch's Adam
            # keeps it: on the parameter's device when fused or capturable, else on the CPU
            on_device = group.get("fused") or group.get("capturable")
            state = {"step": torch.tensor(step, dtype=torch.float32, device=p.device if on_device else "cpu")}
            for key in ADAM_KEYS:  # read on the CPU, kept beside the parameter
                value = _tensor(folder / f"{key}.pt").view_as(p)
                state[key] = value.to(device=p.device, dtype=p.dtype).clone()
            optimizer.state[p] = state
    # every conversion has this file, a stage-3 one too (zero_stage.make_loadable_under_any_stage copies it)
    saved = torch.load(tag_dir / MODEL_STATES, map_location="cpu", weights_only=False)
    buffers = dict(engine.module.named_buffers())
    for name, value in (saved.get("module") or {}).items():
        if name in buffers and torch.is_tensor(value) and value.shape == buffers[name].shape:
            buffers[name].copy_(value)
    for key in ("global_steps", "global_samples", "skipped_steps"):
        if key in saved:
            setattr(engine, key, saved[key])


def _tensor(path: Path) -> torch.Tensor:
    """A universal file's tensor: ``{"param": tensor}`` (stages 0-2) or the bare tensor (stage 3)."""
    value = torch.load(path, map_location="cpu", weights_only=False)
    return value["param"] if isinstance(value, dict) else value
