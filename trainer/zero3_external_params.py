"""Makes the plain-PyTorch model safe under ZeRO-3 without teaching model/ about DeepSpeed.

ZeRO-3 gathers a module's own parameters only while that module's forward runs. A parameter read elsewhere
(a tied embedding used by a head, a scale used by a loss) must be registered as an "external parameter" of a
module whose forward spans the use; we register such parameters on the objectives module, whose forward spans
the whole step. ``external_reads`` finds such reads by running a step on a plain module, so a test can check
that EXTERNAL_SUFFIXES lists every one of them.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

# Parameter names (suffixes) read outside the forward of the module that owns them:
# - logit_scale: UnimoModel's temperature, read by the CMCL/ITM code in PretrainObjectives.forward.
EXTERNAL_SUFFIXES = ("logit_scale",)


def external_parameters(root: nn.Module) -> list[nn.Parameter]:
    found = []
    for name, p in root.named_parameters():
        if name.endswith(EXTERNAL_SUFFIXES):
            found.append(p)
    return found


def register_external_parameters(root: nn.Module) -> int:
    """Registers the parameters that need it on ``root``; returns how many (no-op without DeepSpeed)."""
    from trainer.ds_extensions import import_deepspeed

    try:
        deepspeed = import_deepspeed()
    except ImportError:
        return 0
    register_external_parameter = deepspeed.zero.register_external_parameter
    params = external_parameters(root)
    for p in params:
        register_external_parameter(root, p)
    return len(params)


# Metadata a partitioned ZeRO-3 parameter still answers correctly; reading it is not a use of the values.
_METADATA = frozenset({"dtype", "device", "requires_grad", "layout", "is_cuda", "is_sparse", "is_leaf"})


def _is_metadata(func) -> bool:
    return getattr(func, "__name__", "") == "__get__" and getattr(func.__self__, "__name__", "") in _METADATA


class _ReadTracker(TorchFunctionMode):
    """Notes every parameter passed to a torch function while none of the modules owning it is running."""

    def __init__(self, owners: dict[int, set[int]], names: dict[int, str], running: list[int]):
        super().__init__()
        self.owners, self.names, self.running = owners, names, running
        self.outside: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_metadata(func):
            return func(*args, **kwargs)
        for leaf in tree_flatten((args, kwargs))[0]:
            owners = self.owners.get(id(leaf)) if isinstance(leaf, nn.Parameter) else None
            if owners is not None and not owners & set(self.running):
                self.outside.add(self.names[id(leaf)])
        return func(*args, **kwargs)


def external_reads(root: nn.Module, step: Callable[[], object]) -> set[str]:
    """Names of ``root``'s parameters that ``step()`` reads outside the forward of every module owning them.

    A parameter is owned by each module holding it directly (a tied weight has several owners); ``step`` runs
    ``root`` on a plain (non-DeepSpeed) module, e.g. ``lambda: objectives(batch, weights)``.
    """
    owners: dict[int, set[int]] = {}
    for module in root.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(module))
    names = {id(p): n for n, p in root.named_parameters(remove_duplicate=False)}
    running: list[int] = []
    handles = []

    def enter(module, args) -> None:  # hooks must return None, or they would replace inputs/outputs
        running.append(id(module))

    def leave(module, args, output) -> None:
        running.pop()

    for module in root.modules():
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    tracker = _ReadTracker(owners, names, running)
    try:
        with tracker:
            step()
    finally:
        for h in handles:
            h.remove()
    return tracker.outside
