"""Resume verification per rank: each rank hashes only the files it will load (its own ZeRO shards and the
shared files), every file's presence and size is still checked, the rank converting a checkpoint for another
world size hashes everything, and the ranks agree so that a shard torn in one rank's part makes all skip it.

The one-process tests lay out a 2-rank checkpoint as DeepSpeed ZeRO-3 names its files; the 2-rank test saves
real checkpoints through CheckpointManager on two gloo ranks and resumes them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from tests.integration.services import free_port
from trainer import checkpoint as ckpt
from trainer.checkpointing.verification import TORN, UNREADABLE, findings, merged_candidates, verify_part
from tests.trainer.checkpoint_fakes import NoReporter, StubLoader

SHARD = "ds/zero_pp_rank_{}_mp_rank_00_{}_states.pt"
JOIN_TIMEOUT_S = 240


def _two_rank_checkpoint(root: Path, step: int = 4) -> Path:
    """A step folder as 2 ZeRO-3 ranks write it: each rank's model and optimizer shard (rank 1's larger, so
    that bytes tell who hashed what), DeepSpeed's shared files, the trainer state, the manifest."""
    d = root / ckpt.step_dir_name(step)
    (d / "ds").mkdir(parents=True)
    for rank, size in ((0, 1000), (1, 5000)):
        for kind in ("model", "optim"):
            (d / SHARD.format(rank, kind)).write_bytes(bytes([rank + 1]) * size)
    (d / "latest").write_text("ds")
    (d / "zero_to_fp32.py").write_text("# DeepSpeed's script\n")
    (d / ckpt.STATE).write_text(json.dumps({"schema": ckpt.SCHEMA_VERSION, "step": step, "world_size": 2}))
    ckpt.write_manifest(d, ckpt.describe_files(d), step)
    return d


def _flip_a_byte(path: Path) -> None:
    """Same size, other content: only a hash finds it."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _same_layout(local: Path, state: dict) -> bool:
    return False  # resumed at the same world size and stage: no conversion


def test_files_for_rank_are_its_shards_and_the_shared_files():
    names = [SHARD.format(r, k) for r in (0, 1, 10) for k in ("model", "optim")]
    names += ["ds/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "ds/mp_rank_00_model_states.pt", "latest",
              ckpt.STATE, "tokenizer.json", "zero_to_fp32.py"]
    assert ckpt.files_for_rank(names, 1) == [
        SHARD.format(1, "model"), SHARD.format(1, "optim"),
        "ds/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "ds/mp_rank_00_model_states.pt", "latest",
        ckpt.STATE, "tokenizer.json", "zero_to_fp32.py"]
    assert SHARD.format(10, "model") not in ckpt.files_for_rank(names, 1)  # rank 1 is not rank 10


def test_a_torn_shard_of_rank_1_is_found_by_rank_1_and_never_hashed_by_rank_0(tmp_path, hashed):
    d = _two_rank_checkpoint(tmp_path)
    _flip_a_byte(d / SHARD.format(1, "optim"))
    hashed.clear()  # what writing the manifest read

    mine = verify_part(str(d), tmp_path / "cache", 0, _same_layout)
    assert mine.problem is None and mine.state["step"] == 4
    assert not any("zero_pp_rank_1" in name for name in hashed)
    shared = sum(f["size"] for rel, f in mine.manifest["files"].items() if ckpt.shard_rank(rel) is None)
    assert mine.hashed_bytes == 2 * 1000 + shared  # rank 0's two shards and the shared files, nothing else

    hashed.clear()
    theirs = verify_part(str(d), tmp_path / "cache", 1, _same_layout)
    assert theirs.problem == f"checkpoint {d}: file {SHARD.format(1, 'optim')} fails its checksum"
    assert not any("zero_pp_rank_0" in name for name in hashed)


def test_every_rank_checks_every_file_is_there_with_its_size(tmp_path, hashed):
    d = _two_rank_checkpoint(tmp_path)
    (d / SHARD.format(1, "model")).write_bytes(b"cut")  # a truncated upload of rank 1's shard
    hashed.clear()  # what writing the manifest read
    part = verify_part(str(d), tmp_path / "cache", 0, _same_layout)
    assert part.problem == f"checkpoint {d}: file {SHARD.format(1, 'model')} has size 3, manifest says 5000"
    (d / SHARD.format(1, "model")).unlink()
    part = verify_part(str(d), tmp_path / "cache", 0, _same_layout)
    assert part.problem == (f"checkpoint {d}: file {SHARD.format(1, 'model')} listed in the manifest is "
                            "missing")
    assert hashed == []  # sizes decide before anything is read


def test_the_rank_that_converts_the_checkpoint_hashes_every_file(tmp_path, hashed):
    """Another world size or stage: the node's first rank converts, reading every shard, so it hashes them."""
    d = _two_rank_checkpoint(tmp_path)
    hashed.clear()  # what writing the manifest read

    def converting(local: Path, state: dict) -> bool:
        return state["world_size"] != 1  # saved by 2 ranks, resumed by 1

    part = verify_part(str(d), tmp_path / "cache", 0, converting)
    assert part.problem is None
    assert sorted(hashed) == sorted(Path(rel).name for rel in part.manifest["files"])
    _flip_a_byte(d / SHARD.format(1, "optim"))
    part = verify_part(str(d), tmp_path / "cache", 0, converting)
    assert part.problem == f"checkpoint {d}: file {SHARD.format(1, 'optim')} fails its checksum"


def test_a_storage_error_while_verifying_is_no_torn_checkpoint(tmp_path, monkeypatch):
    """A read that fails for the storage (ESTALE, a reset download, an S3 outage during the restore) says
    nothing of the checkpoint: it is not skipped for an older one, nor moved aside; the attempt fails and the
    next reads it. It used to be taken for torn: the run lost a checkpoint interval to a blip, and moved a
    whole checkpoint aside for good."""
    import errno

    from trainer.checkpointing.manager import CheckpointManager
    from trainer.config import load_config
    from tests.trainer.checkpoint_fakes import StubEngine

    run = tmp_path / "run"
    cfg = load_config(None, ["run.name=t", "scaling.num_workers=1", "train.global_micro_batches=1"])
    manager = CheckpointManager(cfg, 0, 1, NoReporter(), run_location=str(run))
    for step in (2, 4):
        local = manager.save_local(step, StubEngine(), StubLoader(), {})
        shutil.copytree(local, run / "checkpoints" / ckpt.step_dir_name(step))
        shutil.rmtree(local)
    real = ckpt.check_hashes
    failures = iter([OSError(errno.ESTALE, "Stale file handle")])

    def flaky(*args):
        error = next(failures, None)
        if error is not None:
            raise error
        return real(*args)

    monkeypatch.setattr(ckpt, "check_hashes", flaky)
    with pytest.raises(ckpt.CheckpointUnreadable, match=r"step_00000004: rank\(s\) \[0\] could not read it"):
        manager.find()
    manager._set_aside_torn(after=2)  # what a resume from step 2 would have done
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert manager.find().state["step"] == 4  # the next attempt reads it


def test_one_rank_needs_no_collective(tmp_path):
    assert findings(TORN, 0, 1) == {0: TORN} and findings(UNREADABLE, 0, 1) == {0: UNREADABLE}
    assert findings(0, 0, 1) == {}
    assert merged_candidates({"b": 2, "c": 4, "a": 2}, 1) == [("c", 4), ("a", 2), ("b", 2)]


# ---- two ranks over gloo -----------------------------------------------------------------------------------

class _RankEngine:
    """Writes one rank's ZeRO-3 shards as DeepSpeed names them (the content is the rank and the step)."""

    def __init__(self, rank: int):
        self.rank = rank

    def zero_optimization_stage(self) -> int:
        return 3  # its files are named as stage 3's

    def save_checkpoint(self, root: str, tag: str, save_latest: bool, client_state=None) -> None:
        (Path(root) / tag).mkdir(parents=True)
        for kind in ("model", "optim"):
            (Path(root) / SHARD.format(self.rank, kind)).write_bytes(bytes([self.rank + 1]) * 4096)


def _rank(rank: int, port: int, run: str, out: str) -> None:
    """Saves steps 2 and 4 on two ranks; rank 0 flips a byte of rank 1's step-4 shard; both resume."""
    import torch
    import torch.distributed as dist

    from trainer.checkpointing.manager import CheckpointManager
    from trainer.config import load_config

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = load_config(None, ["run.name=verify", "scaling.num_workers=2", "train.global_micro_batches=2",
                             "deepspeed.zero_stage=3"])  # the layout saved: no conversion, each rank its part
    manager = CheckpointManager(cfg, rank, 2, NoReporter(), run_location=run)
    for step in (2, 4):
        local = manager.save_local(step, _RankEngine(rank), StubLoader(), {})
        shutil.copytree(local, Path(run) / "checkpoints" / ckpt.step_dir_name(step), dirs_exist_ok=True)
        shutil.rmtree(local)
    dist.barrier()
    if rank == 0:
        _flip_a_byte(Path(run) / "checkpoints" / ckpt.step_dir_name(4) / SHARD.format(1, "optim"))
    dist.barrier()
    seen: list[str] = []
    real = ckpt.sha256_file

    def recording(path, *args, **kwargs):
        seen.append(str(Path(path).relative_to(run)))
        return real(path, *args, **kwargs)

    ckpt.sha256_file = recording  # this process is the test's own child: nothing else reads it
    found = manager.find()
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"step": found.state["step"], "torn": [step for step, _ in manager._torn], "hashed": seen}))
    dist.destroy_process_group()


@pytest.mark.integration  # two processes and a gloo group
def test_both_ranks_skip_a_checkpoint_whose_rank_1_shard_is_torn(tmp_path):
    run, out = tmp_path / "run", tmp_path / "out"
    (run / "checkpoints").mkdir(parents=True)
    out.mkdir()
    ctx = mp.start_processes(_rank, args=(free_port(), str(run), str(out)), nprocs=2, join=False,
                             start_method="spawn")
    started = time.monotonic()
    while not ctx.join(timeout=5):
        if time.monotonic() - started > JOIN_TIMEOUT_S:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the two ranks did not finish in {JOIN_TIMEOUT_S} s: a collective did not pair up")
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["step"] for r in results] == [2, 2]  # both fell back to step 2, so they agree
    assert [r["torn"] for r in results] == [[4], [4]]  # and both know step 4 is torn (rank 0 moves it aside)
    rank0_step4 = [p for p in results[0]["hashed"] if p.startswith(f"checkpoints{os.sep}step_00000004")]
    # rank 0 hashed its part of step 4, never rank 1's shard
    assert rank0_step4 and not any("zero_pp_rank_1" in p for p in rank0_step4)
    assert any(p.endswith(SHARD.format(1, "optim")) and "step_00000004" in p for p in results[1]["hashed"])
