"""A same-world-size resume continues the run's random streams: the draws after step K (ITM's hard negatives
come from the global generator) are those of the uninterrupted run. The loader used to take a draw from that
generator whenever it started an iterator, which a resumed run does at another point of the run than the
uninterrupted one: every resume shifted the stream by one draw and trained on other negatives."""

from __future__ import annotations

import pytest
import torch

from data_pipeline.loader import build_loader
from data_pipeline.synthetic import write_synthetic_dataset
from trainer.checkpointing.manager import rng_state, set_rng_state
from trainer.config import load_config
from trainer.objectives import sample_negatives

STEPS, RESUME_AT = 5, 2


@pytest.fixture(scope="module")
def data_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("rng")
    urls = write_synthetic_dataset(str(root), n_pairs=60, n_text=0, n_images=0, n_eval=0,
                                   samples_per_shard=20, image_size=16)
    return load_config(None, [f"data.pair.urls={urls['pair']}", f"data.tokenizer={urls['tokenizer']}",
                              "data.num_workers=0", "data.pair.batch_size=4"]).data


def _steps(data_cfg, first: int, cursor=None, rng=None, save_at=None) -> tuple[list, dict]:
    """Steps first..STEPS-1 of a run seeded as Trainer.build seeds it (then restoring ``rng`` and the loader
    ``cursor`` of a checkpoint, as a resume does): each step's sample keys and ITM draws; with ``save_at``,
    the checkpoint's cursor and random state taken after that step."""
    torch.manual_seed(0)
    if rng is not None:
        set_rng_state(rng)
    loader = build_loader(data_cfg, rank=0, world_size=1, seq_len=16, image_size=16, patch_size=8,
                          state=cursor, objectives={"itc", "itm"})
    batches = iter(loader)
    sim, same = torch.randn(4, 4, generator=torch.Generator().manual_seed(1)), torch.eye(4, dtype=torch.bool)
    seen, saved = [], {}
    for step in range(first, STEPS):
        keys = next(batches)["keys"]["pair"]
        seen.append((list(keys), sample_negatives(sim, same)[0].tolist(), float(torch.rand(()))))
        if step + 1 == save_at:
            saved = {"cursor": loader.state_dict(), "rng": rng_state()}
    return seen, saved


def test_a_resume_draws_what_the_uninterrupted_run_draws(data_cfg):
    uninterrupted, saved = _steps(data_cfg, 0, save_at=RESUME_AT)
    resumed, _ = _steps(data_cfg, RESUME_AT, cursor=saved["cursor"], rng=saved["rng"])
    assert [keys for keys, *_ in resumed] == [keys for keys, *_ in uninterrupted[RESUME_AT:]]  # same samples
    assert resumed == uninterrupted[RESUME_AT:]  # and the same draws


def test_starting_the_loader_takes_nothing_from_the_global_generator(data_cfg):
    torch.manual_seed(0)
    before = torch.get_rng_state()
    next(iter(build_loader(data_cfg, rank=0, world_size=1, seq_len=16, image_size=16, patch_size=8,
                           objectives={"itc"})))
    assert torch.equal(torch.get_rng_state(), before)


def test_an_rng_blob_without_a_gpu_state_restores_the_cpu_one():
    """Checkpoints written before the GPU's generator was recorded (and any saved on a CPU) hold only the
    CPU's."""
    import base64
    import io

    torch.manual_seed(3)
    buf = io.BytesIO()
    torch.save({"cpu": torch.get_rng_state()}, buf)
    expected = torch.rand(3)
    set_rng_state(base64.b64encode(buf.getvalue()).decode())
    assert torch.equal(torch.rand(3), expected)
