"""CMCL on 2 gloo ranks equals, loss and gradients, one process computing over the concatenated batch."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from tests.integration.services import free_port
from tests.trainer.test_objectives import make_batch, make_model
from trainer.objectives import PretrainObjectives
import pytest

# Integration tier: two processes over gloo.
pytestmark = pytest.mark.integration

WORLD = 2
B = 3  # pairs per rank
TOL = 1e-5


def _global_batch() -> dict:
    # image 5 appears on both ranks (rows 1 and 4): a positive across ranks, found only through the gather
    ids = torch.tensor([0, 5, 2, 3, 5, 6])
    return make_batch(B=WORLD * B, seed=3, image_ids=ids)["pair"]


def _shard(pair: dict, rank: int) -> dict:
    return {k: v[rank * B:(rank + 1) * B] for k, v in pair.items()}


def _loss_and_grads(obj: PretrainObjectives, pair: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    obj.zero_grad(set_to_none=True)
    total, parts = obj({"pair": pair}, {"itc": 1.0})
    total.backward()
    grads = {n: p.grad.clone() for n, p in obj.named_parameters() if p.grad is not None}
    return parts["itc"].detach(), grads


def _detached_gather(t: torch.Tensor) -> torch.Tensor:
    """The classic bug: gathered features without gradients back to the rank that owns them."""
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    parts[dist.get_rank()] = t
    return torch.cat(parts)


def _mean_over_ranks(loss: torch.Tensor, grads: dict) -> tuple[torch.Tensor, dict]:
    """What data parallelism (DeepSpeed, DDP) does with per-rank losses and gradients: the mean."""
    import torch.distributed as dist

    loss = loss.clone()
    dist.all_reduce(loss)
    for g in grads.values():
        dist.all_reduce(g)
        g /= WORLD
    return loss / WORLD, grads


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        pair = _shard(_global_batch(), rank)
        results = {}
        for name, gather in (("autograd", None), ("detached", _detached_gather)):
            obj = PretrainObjectives(make_model(), rank=rank, world_size=WORLD, gather=gather)
            results[name] = _mean_over_ranks(*_loss_and_grads(obj, pair))
        if rank == 0:
            torch.save(results, f"{out_dir}/ranks.pt")
    finally:
        dist.destroy_process_group()


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_itc_on_two_ranks_equals_one_process_over_the_global_batch(tmp_path):
    torch.set_num_threads(1)
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = torch.load(tmp_path / "ranks.pt")
    ref_loss, ref_grads = _loss_and_grads(PretrainObjectives(make_model()), _global_batch())

    loss, grads = ranks["autograd"]
    assert abs(float(loss - ref_loss)) < TOL
    assert _max_diff(grads, ref_grads) < TOL
    assert float(ref_grads["model.logit_scale"].abs()) > 0  # the temperature is part of the comparison

    # The comparison is sharp enough to catch a gather that drops the other ranks' gradients.
    loss, grads = ranks["detached"]
    assert abs(float(loss - ref_loss)) < TOL  # same forward ...
    assert _max_diff(grads, ref_grads) > 100 * TOL  # ... wrong backward
