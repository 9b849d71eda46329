"""A checkpoint save on a small filesystem filled on purpose (a 2 MiB tmpfs as the node's TMPDIR): the save
that cannot fit is refused before it starts, naming the folder and the bytes; a save that hits a real ENOSPC
part-way leaves no partial folder behind. Needs permission to mount a tmpfs (root or CAP_SYS_ADMIN); skipped
otherwise, saying so."""

from __future__ import annotations

import errno
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.trainer.checkpoint_fakes import StubLoader
from tests.trainer.test_checkpoint_state import _manager
from trainer.checkpointing.manager import NoSpaceForCheckpoint

pytestmark = pytest.mark.integration  # mounts a filesystem

DISK = 2 << 20


class SizedEngine:
    """Writes one shard of ``size`` bytes, as DeepSpeed's save would, through the real filesystem."""

    def __init__(self, size: int):
        self.size = size

    def zero_optimization_stage(self) -> int:
        return 3  # its files are named as stage 3's

    def save_checkpoint(self, root: str, tag: str, save_latest: bool, client_state=None) -> None:
        (Path(root) / tag).mkdir(parents=True)
        with open(Path(root) / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt", "wb") as f:
            for _ in range(self.size // 65536 + 1):
                f.write(b"\0" * 65536)  # ENOSPC comes from here once the disk is full


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): needs root or CAP_SYS_ADMIN")
    monkeypatch.setattr(tempfile, "tempdir", str(mnt))  # the node's TMPDIR, where ranks save first
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def leftovers(disk: Path) -> list[str]:
    return sorted(p.name for p in disk.iterdir() if p.name != "filler")


def test_a_full_disk_is_named_before_the_save_and_a_cut_save_leaves_nothing(small_disk, tmp_path,
                                                                            one_rank_group):
    manager = _manager([], tmp_path / "run")
    manager.load(lambda universal: None)
    first = manager.save_local(1, SizedEngine(600_000), StubLoader(), {})
    assert manager.last_size >= 600_000
    shutil.rmtree(first)  # uploaded: the local copy goes

    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - 300_000))  # another tenant of the disk
    with pytest.raises(NoSpaceForCheckpoint, match=rf"not enough free space in {small_disk} for rank 0's "
                                                   rf"checkpoint save of step 2: it needs about \d+ bytes"):
        manager.save_local(2, SizedEngine(600_000), StubLoader(), {})
    assert leftovers(small_disk) == []  # refused before anything was written

    (small_disk / "filler").unlink()
    manager.last_size = None  # no size to go by (the job's first save): the disk itself says no
    with pytest.raises(OSError) as cut:
        manager.save_local(3, SizedEngine(2 * DISK), StubLoader(), {})
    assert cut.value.errno == errno.ENOSPC
    assert leftovers(small_disk) == [], "a save cut by ENOSPC left its partial folder"
    assert shutil.disk_usage(small_disk).used < 100_000  # the space is free again for the next try
