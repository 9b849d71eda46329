"""deepspeed.one_pass_grad_norm (trainer/grad_norm.py): at ZeRO stages 1, 2 and 3 over two gloo ranks (ZeRO-3
with every parameter partitioned), every objective, clipping active and two micro-batches per step, the
one-pass norm is DeepSpeed's per-group norm (to rounding), is what DeepSpeed's step calls, and trains to the
same weights; a non-finite gradient still skips the update and a huge finite one is skipped or clipped as by
DeepSpeed; and where the one-pass norm does not apply, DeepSpeed's stays, with the
reason."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.trainer.gloo_ranks import run_on_gloo_ranks

STEPS = 3
ACCUMULATE = 2  # micro-batches per rank and optimizer step
STAGES = (1, 2, 3)


def _poison_gradients(engine, value: float) -> None:
    """``value`` in this rank's gradient partition, where each stage's norm reads it."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "grad_partitions_flat_buffer"):  # ZeRO-3
        optimizer.grad_partitions_flat_buffer[0] = value
    else:  # ZeRO-1/2: this rank's partition gradients, gathered per group at the accumulation boundary
        first = optimizer.averaged_gradients[0][0]
        first[(0,) * first.dim()] = value


def _poisoned_step(engine, rank: int, value: float, seed: int) -> None:
    from tests.trainer.test_objectives import ALL, make_batch

    for micro in range(ACCUMULATE):
        total, _ = engine(make_batch(seed=seed + micro + rank), ALL)
        engine.backward(total)
        if micro == ACCUMULATE - 1 and rank == 0:  # one rank's partition: the all-reduce spreads it
            _poison_gradients(engine, value)
        engine.step()


def _count_calls(optimizer) -> list:
    """Counts the calls of the one-pass norm installed on ``optimizer``: that DeepSpeed's step runs it."""
    calls: list = []
    for name in ("_get_norm_groups", "scaled_global_norm"):
        if name in vars(optimizer):
            installed = vars(optimizer)[name]

            def counted(*args, installed=installed, **kwargs):
                calls.append(1)
                return installed(*args, **kwargs)

            setattr(optimizer, name, counted)
    return calls


def _train(rank: int, world: int, stage: int, one_pass: bool) -> dict:
    from tests.trainer.test_objectives import ALL, make_batch, make_model
    from tests.trainer.test_zero_stage import _gathered
    from trainer.config import load_config
    from trainer.engine import build_engine
    from trainer.objectives import PretrainObjectives

    cfg = load_config(None, [f"deepspeed.zero_stage={stage}", f"scaling.num_workers={world}",
                             f"train.global_micro_batches={ACCUMULATE * world}", "optimizer.lr=0.01",
                             "optimizer.schedule=constant", "optimizer.warmup_steps=0",
                             "optimizer.grad_clip=0.5",  # below every step's norm: the clip is applied
                             "deepspeed.param_persistence_threshold=1",  # ZeRO-3: every parameter partitioned
                             f"deepspeed.one_pass_grad_norm={str(one_pass).lower()}"])
    engine, _, _ = build_engine(cfg, PretrainObjectives(make_model(), rank, world), world, on_gpu=False)
    one_pass_installed = any(name in vars(engine.optimizer) for name in ("_get_norm_groups",
                                                                         "scaled_global_norm"))
    calls = _count_calls(engine.optimizer)
    losses, norms = [], []
    for step in range(STEPS):
        for micro in range(ACCUMULATE):
            total, _ = engine(make_batch(seed=10 * step + ACCUMULATE * rank + micro), ALL)
            engine.backward(total)
            engine.step()
            losses.append(float(total))
        norms.append(float(engine.get_global_grad_norm()))
    weights = _gathered(engine)
    # A non-finite gradient: DeepSpeed's step sees an invalid norm and skips the update, with either norm.
    _poisoned_step(engine, rank, float("nan"), seed=99)
    after_nan = _gathered(engine)
    # A finite one past fp32's range once squared: ZeRO-1/2 (fp32 sums) skip, ZeRO-3 (fp64) clips and steps.
    _poisoned_step(engine, rank, 1e20, seed=97)
    return {"losses": losses, "norms": norms, "weights": weights, "after_nan": after_nan,
            "after_huge": _gathered(engine), "one_pass": one_pass_installed, "calls": len(calls)}


def _records(rank: int, world: int) -> dict:
    return {(stage, one_pass): _train(rank, world, stage, one_pass)
            for stage in STAGES for one_pass in (True, False)}


@pytest.fixture(scope="module")
def record(tmp_path_factory) -> dict:
    return run_on_gloo_ranks(_records, tmp_path_factory.mktemp("grad_norm"))


@pytest.mark.integration  # two ranks over gloo in spawned processes
@pytest.mark.parametrize("stage", STAGES)
def test_one_pass_norm_is_deepspeeds_norm_and_trains_to_the_same_weights(record, stage):
    ours, theirs = record[stage, True], record[stage, False]
    assert ours["one_pass"] and not theirs["one_pass"]  # the trainer's build did replace it, the switch works
    assert ours["calls"] == STEPS + 2  # DeepSpeed's step took its norm from it at every optimizer step
    assert all(n > 0.5 for n in theirs["norms"])  # clipping was active on every step
    # ZeRO-1/2 sum DeepSpeed's groups and ranks in fp32, ZeRO-3 in fp64
    assert ours["norms"] == pytest.approx(theirs["norms"], rel=1e-6 if stage < 3 else 1e-12)
    assert ours["losses"] == pytest.approx(theirs["losses"], rel=1e-6)
    assert ours["losses"][-1] < ours["losses"][0]
    far = {n: (w - theirs["weights"][n]).abs().max().item() for n, w in ours["weights"].items()
           if not torch.allclose(w, theirs["weights"][n], rtol=1e-5, atol=1e-7)}
    assert far == {}


@pytest.mark.integration
@pytest.mark.parametrize("stage", STAGES)
def test_a_non_finite_gradient_still_skips_the_update(record, stage):
    for one_pass in (True, False):
        run = record[stage, one_pass]
        changed = [n for n, w in run["weights"].items() if not torch.equal(run["after_nan"][n], w)]
        assert changed == [], (one_pass, changed[:3])


@pytest.mark.integration
@pytest.mark.parametrize("stage", STAGES)
def test_a_huge_finite_gradient_is_skipped_or_clipped_as_by_deepspeed(record, stage):
    def stepped(run: dict) -> bool:
        return any(not torch.equal(run["after_huge"][n], w) for n, w in run["after_nan"].items())

    assert stepped(record[stage, True]) == stepped(record[stage, False]) == (stage == 3)


def _zero3(**changes) -> SimpleNamespace:
    group = object()
    params = [torch.nn.Parameter(torch.zeros(4)) for _ in range(3)]
    for p in params:
        p.partition_numel = lambda: 4
    fields = {"grad_partitions_flat_buffer": torch.zeros(12), "fp16_groups": [params[:2], params[2:]],
              "model_parallel_group": None, "offload_optimizer": False, "_get_norm_groups": None,
              "_get_param_partition_group": lambda p: group}
    return SimpleNamespace(**{**fields, **changes})


def _zero12(**changes) -> SimpleNamespace:
    params = [torch.nn.Parameter(torch.zeros(4)) for _ in range(3)]
    fields = {"bit16_groups": [params[:2], params[2:]], "averaged_gradients": {}, "dp_process_group": None,
              "model_parallel_group": None, "cpu_offload": False, "has_moe_layers": False,
              "scaled_global_norm": None}
    return SimpleNamespace(**{**fields, **changes})


@pytest.mark.parametrize("kind, changes, reason", [
    (_zero3, {}, None),
    (_zero3, {"offload_optimizer": True}, "offload_optimizer"),
    (_zero3, {"use_muon": True}, "Muon"),
    (_zero3, {"model_parallel_group": object()}, "model parallelism"),
    (_zero3, {"_get_param_partition_group": lambda p: object()}, "not all partitioned over one"),
    (_zero3, {"grad_partitions_flat_buffer": torch.zeros(16)}, "one flat buffer"),
    (_zero12, {}, None),
    (_zero12, {"cpu_offload": True}, "offload_optimizer"),
    (_zero12, {"has_moe_layers": True}, "mixture-of-experts"),
    (_zero12, {"model_parallel_group": object()}, "model parallelism"),
    (_zero12, {"bit16_groups": []}, "no parameters"),
])
def test_where_the_one_pass_norm_does_not_apply_deepspeeds_stays_and_says_why(kind, changes, reason):
    from trainer.grad_norm import install_one_pass_grad_norm, why_not_one_pass

    optimizer = kind(**changes)
    found = why_not_one_pass(optimizer)
    assert (found is None) if reason is None else (reason in found)
    assert install_one_pass_grad_norm(optimizer) is (reason is None)
    replaced = "_get_norm_groups" if kind is _zero3 else "scaled_global_norm"
    assert (getattr(optimizer, replaced) is None) is (reason is not None)


@pytest.mark.parametrize("kind, attribute", [(_zero3, "grad_partitions_flat_buffer"),
                                             (_zero12, "averaged_gradients")])
def test_a_deepspeed_without_what_it_reads_keeps_its_own_norm(kind, attribute):
    from trainer.grad_norm import why_not_one_pass

    optimizer = kind()
    delattr(optimizer, attribute)
    assert f"lacks {attribute}" in why_not_one_pass(optimizer)


@pytest.mark.parametrize("kind, groups", [(_zero3, "fp16_groups"), (_zero12, "bit16_groups")])
def test_a_frozen_or_pipeline_replicated_parameter_keeps_deepspeeds_norm(kind, groups):
    from trainer.grad_norm import why_not_one_pass

    optimizer = kind()
    getattr(optimizer, groups)[0][0].requires_grad_(False)
    assert "without gradients" in why_not_one_pass(optimizer)
    optimizer = kind()
    getattr(optimizer, groups)[0][0].ds_pipe_replicated = True
    assert "pipeline" in why_not_one_pass(optimizer)
