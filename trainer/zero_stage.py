"""Chooses the ZeRO stage for ``deepspeed.zero_stage: auto`` and tells when a checkpoint needs converting.

The choice weighs the model states each rank holds (weights, gradients, fp32 master weights and Adam moments)
against a fraction of the device's memory (``deepspeed.auto_memory_fraction``; the rest is left to
activations, communication buffers and allocator fragmentation):

    stage 1: (w + g) P + 12 P / N      stage 2: w P + (g + 12) P / N      stage 3: (w + g + 12) P / N

with P parameters, N ranks, w = g = 2 bytes in bf16 and 4 in fp32 (DeepSpeed keeps an fp32 master copy in
both). Stage 3 gathers every weight before each use and re-partitions it after: on one H100 the ZeRO-3 step
of ``base`` took 4.2x the plain loop's, all host work. So it is chosen only where it is needed: with any
offload (offload_params needs it; offload_optimizer is set where memory is short, as for xl) or where the
states do not fit otherwise (xl, large on small GPUs). Else the cheapest stage that fits, 1 before 2 (stage 2
adds per-parameter gradient hooks and bucket copies on the step's path).

On one rank there is nothing to partition, and stage 0 (no ZeRO) is the cheapest: measured by
bench/bench_host_overhead.py at near-zero compute, stage 1's per-parameter copies in and out of its flat
buffer cost 7-37k more ops per step than the plain loop, stage 0 1.6-10.7k (docs/BENCHMARKS.md). So a
one-rank job gets stage 0 where it fits, with fp32 or ``autocast`` precision: there DeepSpeed steps the torch
optimizer itself, whose checkpoints trainer/checkpointing/stage0.py converts to and from DeepSpeed's
universal format (a later resume at another world size or stage needs that). Under ``bf16`` DeepSpeed wraps
the optimizer in a layout of its own, so one rank stays at stage 1 there. An explicit 0 is honoured.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config import RunConfig
from trainer.config_loader import to_dict

MASTER_AND_ADAM_BYTES = 12  # fp32 master weights + Adam's two fp32 moments, per parameter


@dataclass(frozen=True)
class ZeroChoice:
    """The stage a run uses and why (printed at start, logged as MLflow params)."""

    stage: int
    reason: str


@functools.lru_cache(maxsize=8)
def _count_params(model_json: str) -> int:
    """Parameters of the model config (built on the meta device: no memory, well under a second for xl)."""
    from model.config import ModelConfig
    from model.unimo import UnimoModel
    from trainer.config_loader import build

    with torch.device("meta"):
        model = UnimoModel(build(ModelConfig, json.loads(model_json)))
    return sum(p.numel() for p in model.parameters())


def parameter_count(cfg: RunConfig) -> int:
    return _count_params(json.dumps(to_dict(cfg)["model"], sort_keys=True))


def state_bytes_per_rank(params: int, world_size: int, stage: int, bf16: bool,
                         offload_optimizer: bool = False, offload_params: bool = False) -> float:
    """Bytes of model states one rank keeps on its device under ``stage`` (the formulas of the file's
    docstring)."""
    w = g = 2 if bf16 else 4
    opt = 0 if offload_optimizer else MASTER_AND_ADAM_BYTES
    n = world_size
    if stage == 0:  # in fp32 (and autocast) the torch optimizer steps the weights themselves: no master copy
        return float((w + g + (opt if bf16 or not opt else opt - 4)) * params)
    if stage == 1:
        return (w + g) * params + opt * params / n
    if stage == 2:
        return w * params + (g + opt) * params / n
    return (0 if offload_params else (w + g) * params / n) + opt * params / n


def device_memory_bytes(on_gpu: bool) -> int:
    """Memory of this rank's device: the GPU's, or on CPU the host's split over the ranks of the node."""
    if on_gpu:
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _agreed_minimum(value: int, on_gpu: bool) -> int:
    """The smallest value over the ranks, so that every rank picks the same stage (a mixed fleet would
    hang)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu and dist.get_backend() == "nccl" \
        else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def choose_stage(params: int, world_size: int, bf16: bool, device_bytes: int, fraction: float,
                 offload_optimizer: bool = False, offload_params: bool = False) -> ZeroChoice:
    """The ``auto`` rule, as a pure function of what it depends on. ``bf16``: DeepSpeed's bf16 mode (bf16
    weights, fp32 master copies in its optimizer); false for fp32 and autocast precision."""
    budget = fraction * device_bytes
    need = {s: state_bytes_per_rank(params, world_size, s, bf16, offload_optimizer, offload_params)
            for s in (1, 2, 3)}
    facts = (f"{params / 1e6:.0f}M params, {world_size} rank(s), {'bf16' if bf16 else 'fp32'}, budget "
             f"{_gib(budget)} = {fraction:g} x {_gib(device_bytes)}")
    if offload_optimizer or offload_params:
        what = "offload_params" if offload_params else "offload_optimizer"
        return ZeroChoice(3, f"{what} is set (stage 3 partitions the weights too); "
                             f"{_gib(need[3])}/rank; {facts}")
    if world_size == 1 and not bf16:
        need[0] = state_bytes_per_rank(params, 1, 0, bf16)
        if need[0] <= budget:
            return ZeroChoice(0, f"one rank, nothing to partition: stage 0 (no ZeRO), {_gib(need[0])} of "
                                 f"model states; {facts}")
    for stage in (1, 2):
        if need[stage] <= budget:
            return ZeroChoice(stage, f"stage {stage} fits: {_gib(need[stage])}/rank of model states; {facts}")
    if need[3] <= budget:
        return ZeroChoice(3, f"only stage 3 fits: {_gib(need[3])}/rank (stage 2: {_gib(need[2])}); {facts}")
    return ZeroChoice(3, f"does not fit even at stage 3 ({_gib(need[3])}/rank); set "
                         f"deepspeed.offload_optimizer=true or add ranks; {facts}")


def resolve_zero_stage(cfg: RunConfig, world_size: int, on_gpu: bool) -> ZeroChoice:
    """The stage this run uses: the config's 0..3, or the ``auto`` choice (the same on every rank)."""
    ds = cfg.deepspeed
    if ds.zero_stage != "auto":
        return ZeroChoice(int(ds.zero_stage), "set in the config (deepspeed.zero_stage)")
    from trainer.ds_config import resolve_precision

    memory = _agreed_minimum(device_memory_bytes(on_gpu), on_gpu)
    return choose_stage(parameter_count(cfg), world_size, resolve_precision(cfg, on_gpu) == "bf16", memory,
                        ds.auto_memory_fraction, ds.offload_optimizer, ds.offload_params)


# ---------------------------------------------------------------------------------------- checkpoints

def _names_under(checkpoint: Path, tag: str) -> list[str]:
    """The file names in the checkpoint's ``tag`` folder: from its manifest when it has one (a resuming node's
    copy of an S3 checkpoint holds only its own ranks' files, trainer/checkpoint.py ``partial_copy``), else
    from the folder."""
    manifest = checkpoint / "manifest.json"
    if manifest.is_file():
        inside = [rel.removeprefix(tag + "/") for rel in json.loads(manifest.read_text()).get("files", {})
                  if rel.startswith(tag + "/")]
        return [name for name in inside if "/" not in name]
    folder = checkpoint / tag
    return [p.name for p in folder.iterdir()] if folder.is_dir() else []


def saved_zero_stage(checkpoint: Path, tag: str = "ds") -> int:
    """The stage family a checkpoint folder was written under, from its file names: 3, 1 (stages 1 and 2 share
    one layout and load into each other) or 0 (no ZeRO optimizer files)."""
    names = _names_under(Path(checkpoint), tag)
    if any(n.startswith("zero_pp_rank_") and n.endswith("_model_states.pt") for n in names):
        return 3
    if any(n.endswith("optim_states.pt") for n in names):
        return 1
    return 0


def _family(stage: int) -> int:
    return 1 if stage in (1, 2) else stage


def needs_universal(found: tuple[Path, dict], cfg: RunConfig, world_size: int, on_gpu: bool,
                    run_stage: int | None = None) -> bool:
    """Whether the checkpoint ``found`` (folder, trainer state) must go through DeepSpeed's universal format:
    saved by another world size, or under a stage whose layout this run's stage cannot load directly. Not a
    stage-0 checkpoint resumed under stage 0: its one file loads at any world size.

    ``run_stage``: this run's stage when already resolved (resolving ``auto`` is an all-reduce)."""
    path, state = found
    stage = resolve_zero_stage(cfg, world_size, on_gpu).stage if run_stage is None else run_stage
    saved = _family(saved_zero_stage(path))
    if saved == _family(stage) == 0:  # no ZeRO: the whole state in one file, which loads at any world size
        return False
    return state["world_size"] != world_size or saved != _family(stage)


def make_loadable_under_any_stage(universal_tag_dir: Path) -> None:
    """Completes a universal checkpoint converted from one ZeRO stage so that an engine of another loads it.

    A universal load takes each weight and its Adam moments from zero/<name>/, but it also reads what only the
    source stage's conversion writes: the model-states file under its own stage's name (for metadata only),
    and in zero/optimizer_state.pt the DeepSpeed version (stages 1-2) or the base optimizer's step and groups
    (stage 3); stages 1-2 read Adam's step from zero/<name>/step.pt and each state as {"param": tensor}, which
    only their conversion writes.
    Each missing piece is derived from the one present; nothing present is changed.
    """
    import shutil

    from trainer.ds_extensions import import_deepspeed

    deepspeed = import_deepspeed()

    folder = Path(universal_tag_dir)
    flat, z3 = folder / "mp_rank_00_model_states.pt", folder / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    if flat.is_file() and not z3.exists():
        shutil.copyfile(flat, z3)
    elif z3.is_file() and not flat.exists():
        shutil.copyfile(z3, flat)
    state_path = folder / "zero" / "optimizer_state.pt"
    sd = torch.load(state_path, weights_only=False)
    param_dirs = [d for d in (folder / "zero").iterdir() if d.is_dir()]
    steps = [d / "step.pt" for d in param_dirs]
    if "optimizer_state_dict" in sd:  # converted from stage 3: bare tensors, no step files
        step = sd["optimizer_state_dict"]["state"][0]["step"]
        for path in steps:
            if not path.exists():
                torch.save(step, path)
        for path in (f for d in param_dirs for f in d.glob("*.pt") if f.name != "step.pt"):
            value = torch.load(path, weights_only=False)
            if torch.is_tensor(value):  # stages 1-2 read {"param": tensor}; stage 3 reads either
                torch.save({"param": value}, path)
    else:  # converted from stage 1 or 2
        step = next((torch.load(p, weights_only=False) for p in steps if p.is_file()), 0)
        sd["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": sd["param_groups"]}
    sd.setdefault("ds_version", deepspeed.__version__)
    torch.save(sd, state_path)


# The settings of an optimizer's parameter group that the run's config sets (torch's Adam family). The LR is
# not one of them: the loop sets it before every step.
GROUP_SETTINGS = ("weight_decay", "betas", "eps", "amsgrad", "maximize", "decoupled_weight_decay")


@contextlib.contextmanager
def run_optimizer_settings(engine):
    """Around any checkpoint load: the optimizer keeps this run's settings, not the checkpoint's.

    A checkpoint carries the optimizer's state (moments, step counts), and its loads also bring back settings:
    torch's ``load_state_dict`` (a resume at the same world size and stage) each group's weight decay, betas
    and eps; DeepSpeed's ZeRO-1/2 load its gradient clip; DeepSpeed's universal load at stage 3 the
    checkpoint's first group's settings for every group (weight decay 0, that of biases and norms). A run
    resumed with a changed ``optimizer.*`` printed and logged the new values and trained with the old ones.
    Each group's own settings are put back by position (the groups come from the same model), and the ZeRO
    optimizers' clip from the engine's config.
    """
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is None:  # an engine without an optimizer (inference) loads weights only
        yield
        return
    kept = [{k: g[k] for k in GROUP_SETTINGS if k in g} for g in optimizer.param_groups]
    yield
    for group, settings in zip(optimizer.param_groups, kept):
        group.update(settings)
    if hasattr(optimizer, "clip_grad"):  # DeepSpeed's ZeRO optimizers clip with a copy of their own
        optimizer.clip_grad = engine.gradient_clipping()


@contextlib.contextmanager
def universal_load_fixed(optimizer):
    """Undoes two slips of DeepSpeed's universal load (a resume from another world size or stage), around
    ``engine.load_checkpoint`` (its group settings: ``run_optimizer_settings``).

    Stage 3 hands every sub-group the same Adam step tensor, which the fused AdamW then increments in place
    once per sub-group, so the bias correction ran ahead: each gets its own copy. The copy goes where torch
    keeps a step (its ``load_state_dict`` does the same): on the parameter's device for a fused or capturable
    Adam, as DeepSpeed's converter loaded every tensor to the CPU. Stages 1-2 fail on a rank that holds no
    part of some group (``_groups_this_rank_holds``).
    """
    with _groups_this_rank_holds(optimizer):
        yield
    inner = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside DeepSpeed's
    for group in inner.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            state = inner.state.get(p, {})
            if torch.is_tensor(state.get("step")):
                step = state["step"].clone()
                state["step"] = step.to(p.device) if on_device else step


@contextlib.contextmanager
def _groups_this_rank_holds(optimizer):
    """Stages 1-2: shows DeepSpeed's universal load only the parameter groups this rank holds a part of.

    Each rank keeps a slice of every group's flat buffer; a group smaller than the ranks' slices (the model's
    1-element temperature, a 2-way bias: trainer/engine.py puts such parameters in groups of their own) lies
    wholly in other ranks' slices. DeepSpeed's load then reads the Adam step of this rank's part of the group,
    of which there is none, and fails with an IndexError (found resuming a one-rank run on two ranks). Such a
    group has no state to load here; Adam starts its state afresh on the first step, over padding only. The
    groups are paired with the checkpoint's groups by position, so the settings the load copies into the shown
    ones may be another group's: the caller puts every group's own settings back (``run_optimizer_settings``).
    """
    lp_groups = getattr(optimizer, "bit16_groups", None)
    inner = getattr(optimizer, "optimizer", None)
    held = [i for i, group in enumerate(lp_groups or ())
            if any(getattr(p, "_hp_mapping", None) is not None for p in group)]
    if lp_groups is None or inner is None or len(held) == len(lp_groups):
        yield
        return
    all_groups = inner.param_groups
    inner.param_groups = [all_groups[i] for i in held]
    optimizer.bit16_groups = [lp_groups[i] for i in held]
    try:
        yield
    finally:
        inner.param_groups, optimizer.bit16_groups = all_groups, lp_groups


def announce(choice: ZeroChoice, rank: int, metrics_logger, whole_units: bool = False) -> None:
    """Prints the choice (rank 0) and logs it as MLflow params, plus a tag that a resume may update.
    ``whole_units``: ZeRO-3 gathers the model's whole units (trainer/zero3_units.py), said on the line."""
    if rank != 0:
        return
    units = "; whole blocks, embeddings and heads gathered at once (deepspeed.zero3_whole_units)"
    print(f"[unimo] ZeRO stage {choice.stage}: {choice.reason}{units if whole_units else ''}", flush=True)
    if metrics_logger is None:
        return

    def log(client, run_id: str) -> None:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        try:
            client.log_batch(run_id, params=[Param("deepspeed.zero_stage_chosen", str(choice.stage)),
                                             Param("deepspeed.zero_stage_reason", choice.reason[:500])])
        except MlflowException as err:  # a resume under another stage: params are immutable, the tag tells
            if err.error_code != "INVALID_PARAMETER_VALUE":
                raise
        client.set_tag(run_id, "unimo.zero_stage", str(choice.stage))

    metrics_logger.call(log, "ZeRO stage params")
