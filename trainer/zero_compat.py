"""Makes the plain-PyTorch model safe under ZeRO-3 without teaching model/ about DeepSpeed.

ZeRO-3 gathers a module's own parameters only while that module's forward runs. A parameter read elsewhere
(a tied embedding used by a head, a scale used by a loss) must be registered as an "external parameter" of a
module whose forward spans the use; we register such parameters on the objectives module, whose forward spans
the whole step.
"""

from __future__ import annotations

from torch import nn

# Parameter names (suffixes) read outside the forward of the module that owns them.
EXTERNAL_SUFFIXES = ("logit_scale",)


def external_parameters(root: nn.Module) -> list[nn.Parameter]:
    found = []
    for name, p in root.named_parameters():
        if name.endswith(EXTERNAL_SUFFIXES):
            found.append(p)
    return found


def register_external_parameters(root: nn.Module) -> int:
    """Registers the parameters that need it on ``root``; returns how many (no-op without DeepSpeed)."""
    try:
        import deepspeed
    except ImportError:
        return 0
    register_external_parameter = deepspeed.zero.register_external_parameter
    params = external_parameters(root)
    for p in params:
        register_external_parameter(root, p)
    return len(params)
