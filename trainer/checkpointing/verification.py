"""Which checkpoint the ranks resume from, at a cost per rank that does not grow with the world size.

Every rank checks that each file of a candidate is present with its size (a stat per file) and hashes only
what it will read: trainer_state.json first (it says whether the checkpoint goes through the universal
conversion), then its own ZeRO shards and data cursor file (and the cursor's elastic view when the world
size changed) and the files every rank reads (``checkpoint.files_for_rank``). A node's first rank hashes
every file when it converts the checkpoint for another world size or ZeRO stage, since the conversion reads
them all. Before, every rank hashed the whole checkpoint: for 64 ranks, 64 times
the checkpoint's bytes read per resume.

On S3 a node downloads only what its ranks hash (``checkpoint.partial_copy``/``fetch_into``), and checks
the presence and size of every file against one listing of the folder: a resume's GETs grow with the files,
not with nodes x files.

A torn file that only one rank hashes must make every rank skip the candidate, so the ranks decide together,
newest first, with one all-reduce of a flag per rank per candidate. One all-gather first merges the ranks'
candidate lists, so that every rank walks the same list and the collectives pair up.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from trainer import checkpoint as ckpt

log = logging.getLogger(__name__)


@dataclass
class Part:
    """What one rank verified of one candidate: the local folder, the manifest (parsed once), the trainer
    state, the bytes hashed, or why this rank finds the candidate torn."""

    local: Path | None = None
    manifest: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)
    hashed_bytes: int = 0
    problem: str | None = None  # torn: a file missing, of another size or checksum, an unreadable manifest
    unreadable: str | None = None  # a storage error while reading it: the checkpoint may well be whole


# What a rank found of a candidate, agreed on by every rank (``findings``).
FINE, TORN, UNREADABLE = 0, 1, 2


def merged_candidates(mine: dict[str, int], world_size: int) -> list[tuple[str, int]]:
    """Every rank's candidates ({location: step}) merged, newest first, in the same order on every rank (one
    all-gather when there are several ranks)."""
    merged = dict(mine)
    if world_size > 1:
        import torch.distributed as dist

        everyone: list = [None] * world_size
        dist.all_gather_object(everyone, mine)
        for theirs in everyone:
            merged.update(theirs)
    return sorted(merged.items(), key=lambda item: (-item[1], item[0]))


def verify_part(location: str, cache_dir: Path, rank: int,
                reads_everything: Callable[[Path, dict], bool], world_size: int | None = None) -> Part:
    """Verifies what ``rank`` will read of the checkpoint at ``location`` (on S3: downloads it into the node's
    partial copy first): the presence and size of every file, the hash of trainer_state.json, then of this
    rank's files (its shards and data cursor file, and the cursor's elastic view when the checkpoint's world
    size is not ``world_size``), or of every file when ``reads_everything(local, state)`` (the rank converts
    it). A problem is returned, not raised, so that this
    rank still takes part in the agreement."""
    part = Part()
    try:
        part.local = ckpt.partial_copy(location, cache_dir)
        part.manifest = ckpt.read_manifest(part.local)
        ckpt.check_sizes(part.local, part.manifest, ckpt.listed_sizes(part.local, location))
        if ckpt.STATE not in part.manifest["files"]:
            raise ckpt.TornCheckpoint(f"checkpoint {part.local}: the manifest lists no {ckpt.STATE}")
        ckpt.fetch_into(part.local, location, [ckpt.STATE])
        part.hashed_bytes = ckpt.check_hashes(part.local, part.manifest, [ckpt.STATE])
        part.state = ckpt.read_state(part.local)
        names = [n for n in part.manifest["files"] if n != ckpt.STATE]
        if not reads_everything(part.local, part.state):
            elastic = world_size is not None and part.state.get("world_size") != world_size
            names = ckpt.files_for_rank(names, rank, elastic=elastic)
        ckpt.fetch_into(part.local, location, names)  # on S3 the node downloads only what its ranks read
        part.hashed_bytes += ckpt.check_hashes(part.local, part.manifest, names)
    except ckpt.TornCheckpoint as err:
        part.problem = str(err if part.local is None else ckpt.named_by_location(err, part.local, location))
    except FileNotFoundError as err:  # a file vanishing: torn for this rank; the others wait for its vote
        part.problem = f"checkpoint {location} could not be read: {err}"
    except OSError as err:  # storage unreachable, a reset download, EIO: nothing said of the checkpoint
        part.unreadable = f"checkpoint {location} could not be read: {err}"
    return part


def finding(part: Part) -> int:
    return UNREADABLE if part.unreadable is not None else TORN if part.problem is not None else FINE


def findings(found: int, rank: int, world_size: int) -> dict[int, int]:
    """{rank: TORN or UNREADABLE} of the ranks that did not find the candidate fine: one all-reduce of a
    code per rank (a few KB for 256 ranks), so that a file only one rank hashes decides for all."""
    if world_size == 1:
        return {rank: found} if found else {}
    import torch.distributed as dist

    device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
              else torch.device("cpu"))
    codes = torch.zeros(world_size, dtype=torch.int64, device=device)
    codes[rank] = found
    dist.all_reduce(codes)
    return {r: code for r, code in enumerate(codes.tolist()) if code}


def log_verified(location: str, part: Part, rank: int, started: float) -> None:
    """Rank 0 says what resuming read (every rank reads about as much: its shards and the shared files)."""
    if rank == 0:
        log.info("checkpoint %s verified: %d files present with their sizes; rank 0 hashed %.1f MB of "
                 "%.1f MB in %.1f s", location, len(part.manifest["files"]), part.hashed_bytes / 1e6,
                 sum(f["size"] for f in part.manifest["files"].values()) / 1e6, time.monotonic() - started)
