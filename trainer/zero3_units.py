"""ZeRO-3 over the model's whole units: one gather and one release per block, embedding, fusion projection
and head (model/layers.py ``whole_units``) instead of one around every Linear and LayerNorm inside them.

DeepSpeed's ZeRO-3 hooks every module that holds parameters: before its forward it gathers them, after it
releases them, and the same again in backward. That host work per module call is what made a ZeRO-3 step 4-5x
the plain loop's at a tiny width (docs/BENCHMARKS.md). DeepSpeed's "leaf modules" hook a module as a whole,
and the model names the modules for which that is safe (each runs whole, tests/model/test_whole_units.py).

What is not taken from DeepSpeed's leaf modules is their gradient path. DeepSpeed reduces a leaf's gradients
from a full-backward hook on the module, which fires once per call: a module called twice in one backward
(the text encoder's blocks with the caption objective, the fusion's level mixers every step) is reduced
twice, the second time with its gradients already handed over (DeepSpeed's shape error or assertion), and
the hook was made for mixture-of-experts layers whose experts may not run. Here every parameter gets
DeepSpeed's own per-parameter reduction hook, the one it uses outside leaf modules: autograd accumulates a
parameter's gradient over all its uses before that hook fires, whatever the number of calls.
"""

from __future__ import annotations

from typing import Any

import torch

from model.layers import whole_units

# What the rewiring reads of DeepSpeed's stage-3 optimizer (DeepSpeed 0.19): checked before it is used, so
# another DeepSpeed says what is missing instead of training with unreduced gradients.
_OPTIMIZER_API = ("_leaf_module_hooks", "_grad_acc_hooks", "fp16_groups", "_max_expected_hooks_seen",
                  "reduce_ready_partitions_and_remove_grads", "should_refresh_expected_hook_count",
                  "reenter_backward_if_needed", "update_hook_state_and_maybe_run_epilogue")


def uses_whole_units(cfg: Any, stage: int) -> bool:
    """Whether a run at ZeRO ``stage`` gathers whole units (the one rule: the engine build and the start-up
    line ask it)."""
    return stage == 3 and cfg.deepspeed.zero3_whole_units


def mark_whole_units(module: torch.nn.Module) -> int:
    """Flags the model's whole units as ZeRO-3 leaf modules (before ``deepspeed.initialize``, which reads the
    flag when it installs its hooks); returns how many."""
    from deepspeed.utils import set_z3_leaf_module

    units = whole_units(module)
    for unit in units:
        set_z3_leaf_module(unit, True)
    return len(units)


def reduce_gradients_per_parameter(optimizer: Any) -> int:
    """After ``deepspeed.initialize``: removes the module-level gradient hooks DeepSpeed put on the leaf
    modules and gives every trainable parameter DeepSpeed's per-parameter reduction hook (as stage3.py builds
    it for parameters outside leaf modules); returns how many.

    Every parameter, not only the units': each hook also counts the hooks to expect in this backward, and
    DeepSpeed's own hooks on the other parameters would count one per leaf module instead of the units'
    parameters. The count decides when the end-of-backward runs only where torch cannot queue the callback
    DeepSpeed prefers (torch 2.13 can), but then it must be right.
    """
    missing = [name for name in _OPTIMIZER_API if not hasattr(optimizer, name)]
    if missing:
        import deepspeed

        raise RuntimeError(
            f"deepspeed.zero3_whole_units: DeepSpeed {deepspeed.__version__}'s ZeRO-3 optimizer "
            f"({type(optimizer).__name__}) lacks {', '.join(missing)}, which gathering whole units needs; "
            "use the DeepSpeed version of the project's lock (requirements/lock.txt), or set "
            "deepspeed.zero3_whole_units=false")
    from deepspeed.runtime.utils import count_used_parameters_in_backward
    from deepspeed.utils.torch import register_grad_hook

    trainable = [p for group in optimizer.fp16_groups for p in group if p.requires_grad]

    def hook_for(param: torch.nn.Parameter):
        def reduce_partition_and_remove_grad(*_unused) -> None:
            refresh = optimizer.should_refresh_expected_hook_count()  # before re-entering, as DeepSpeed does
            optimizer.reenter_backward_if_needed()
            optimizer.reduce_ready_partitions_and_remove_grads(param)
            expected = (count_used_parameters_in_backward(trainable) if refresh
                        else optimizer._max_expected_hooks_seen)
            optimizer.update_hook_state_and_maybe_run_epilogue(expected)

        return reduce_partition_and_remove_grad

    for handle in [*optimizer._leaf_module_hooks, *optimizer._grad_acc_hooks]:
        handle.remove()
    optimizer._leaf_module_hooks = []
    optimizer._grad_acc_hooks = [register_grad_hook(p, hook_for(p)) for p in trainable]
    return len(trainable)
