"""CPU offload of the optimizer (and parameters) under ZeRO-3: the engine builds with the trainer's optimizer
and trains to the same weights as without offload.

configs/xl.yaml ships with deepspeed.offload_optimizer=true; DeepSpeed refused the trainer's AdamW there until
ds_config set zero_force_ds_cpu_optimizer=false. Runs in a spawned process (one gloo rank) so that DeepSpeed's
process group and its process-wide patches stay out of the test process.
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from tests.integration.services import free_port

# Integration tier: DeepSpeed ZeRO-3 engines over gloo.
pytestmark = pytest.mark.integration

pytest.importorskip("deepspeed")
STEPS = 2
VARIANTS = {"none": {}, "optimizer": {"offload_optimizer": True},
            "optimizer+params": {"offload_optimizer": True, "offload_params": True}}


def _final_weights(cfg, batches) -> dict[str, torch.Tensor]:
    """The trainer's engine (trainer.loop.build_engine) after len(batches) steps: its full fp32 weights."""
    import deepspeed

    from tests.trainer.test_objectives import ALL, make_model
    from trainer.loop import build_engine
    from trainer.objectives import PretrainObjectives

    engine, _, _ = build_engine(cfg, PretrainObjectives(make_model()), world_size=1, on_gpu=False)
    for batch in batches:
        total, _ = engine(batch, ALL)
        engine.backward(total)
        engine.step()
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: p.detach().clone() for name, p in params.items()}


def _worker(rank: int, port: int, out: str) -> None:
    import os

    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch.distributed as dist

    from tests.trainer.test_objectives import make_batch
    from trainer.config import RunConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    batches = [make_batch(seed=20 + i) for i in range(STEPS)]
    results = {}
    for name, settings in VARIANTS.items():
        cfg = RunConfig()
        cfg.train.global_micro_batches = 1
        cfg.optimizer.lr = 1e-2  # large enough that a step the optimizer skipped would show
        cfg.deepspeed.zero_stage = "3"  # every variant under ZeRO-3 (auto would take stage 1 without offload)
        for key, value in settings.items():
            setattr(cfg.deepspeed, key, value)
        results[name] = _final_weights(cfg, batches)
    torch.save(results, out)
    dist.destroy_process_group()


def test_offloaded_optimizer_and_params_train_to_the_same_weights(tmp_path):
    from tests.trainer.test_objectives import make_model

    out = tmp_path / "weights.pt"
    mp.start_processes(_worker, args=(free_port(), str(out)), nprocs=1, join=True, start_method="spawn")
    results = torch.load(out)
    initial = {f"model.{n}": p for n, p in make_model().named_parameters()}  # the objectives module wraps it
    reference = results["none"]
    moved = [n for n, w in reference.items() if not torch.equal(w, initial[n].detach())]
    assert len(moved) > len(reference) // 2, "the reference run did not train"
    travel = _global_norm({n: reference[n] - initial[n].detach() for n in reference})
    for name in ("optimizer", "optimizer+params"):
        got = results[name]
        assert got.keys() == reference.keys()
        gap = _global_norm({n: got[n] - reference[n] for n in reference})
        # Tolerance from the operation, not from float order: each Adam step moves a weight by about lr, so a
        # skipped or doubled one of the STEPS steps moves the whole model by ~1/STEPS of the reference's
        # travel (measured 0.46 with the last offloaded step skipped). Summation order only flips Adam's
        # first-step sign for a few near-zero gradients (seen: 3 weights off by 4e-6); measured: 1.2e-6 of the
        # travel.
        assert gap < 0.01 * travel, (f"offload {name}: the weights are {gap / travel:.3f} of the reference's "
                                     "travel away from the run without offload (a skipped "
                                     "or repeated step?)")


def _global_norm(tensors: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors.values())))
