"""Resume verification per rank against the old full verification, on checkpoints laid out as 64 and 256
ranks of the xl flavor write them (ZeRO-3).

The old algorithm (every rank hashes every file of the checkpoint: kept below as ``old_full_verify``, a copy
of trainer/checkpoint.py's verify before per-rank verification) is the baseline; the new one is what each
rank runs at resume (trainer/checkpointing/verification.py ``verify_part``: every file's presence and size,
the hash of trainer_state.json, then of this rank's ZeRO shards and the shared files).

The checkpoint is written for real, file names as DeepSpeed's ZeRO-3 save writes them under bf16
(``ds/bf16_zero_pp_rank_R_mp_rank_00_optim_states.pt``, ``ds/zero_pp_rank_R_mp_rank_00_model_states.pt``,
``latest``, ``zero_to_fp32.py``) plus unimo's ``trainer_state.json`` and ``tokenizer.json``, every size
divided by SCALE (64), so that a layout is about 0.8 GB on disk (one layout at a time) and the run takes well
under two minutes on the shared 2-core VM. Full-scale sizes: each rank's optimizer shard holds 12 bytes per
element of its padded partition of xl's 4.38 B parameters (bench/scale_sim.py ``xl_partition``: 822 MB at 64
ranks, 206 MB at 256); trainer_state.json holds every rank's data cursor and RNG, 1.0 MB + 0.59 MB per rank at
configs/xl.yaml's data settings (the line through the 8 and 16 rank figures of docs/BENCHMARKS.md, "Scale
simulation"); model_states 160 KB per rank (ZeRO-3 keeps parameter shapes and buffers there, no weights; an
estimate, under 1% of the bytes); tokenizer.json 466 KB (a BERT vocabulary).

Bytes read per rank are exact for every rank (from the manifest: what each rank hashes); times are measured
for the old verification once (it is the same on every rank) and for the new one on ranks 0, W/2 and W-1. The
files were just written, so both read from the page cache: hashing speed, not disk or network, sets the
times here; a cold cache on a shared file system makes the old figure worse, not the ratio better. The one
all-reduce per candidate the ranks add (a flag per rank: 2 KB at 256 ranks) is not in the times.

    .venv/bin/python bench/bench_resume_verify.py [--worlds 64 256] [--scale 64]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.scale_sim import xl_partition  # noqa: E402
from trainer import checkpoint as ckpt  # noqa: E402
from trainer.checkpointing.verification import verify_part  # noqa: E402

SCALE = 64
MODEL_STATES_BYTES = 160_000
STATE_BYTES = (1_000_000, 590_000)  # trainer_state.json: fixed + per rank
TOKENIZER_BYTES = 466_000
REPEAT = 3
BLOCK = bytes(range(256)) * 4096  # 1 MiB written over and over: hashing does not care what the bytes are


def write_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(BLOCK[:min(left, len(BLOCK))])
            left -= len(BLOCK)


def write_layout(root: Path, world: int, scale: int) -> None:
    """A step folder as ``world`` ZeRO-3 ranks of xl write it, sizes divided by ``scale``; then its
    manifest, built as the manager builds it."""
    optim = xl_partition(world)["optim_bytes_per_rank"] // scale
    (root / "ds").mkdir(parents=True)
    for rank in range(world):
        write_file(root / f"ds/bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", optim)
        write_file(root / f"ds/zero_pp_rank_{rank}_mp_rank_00_model_states.pt", MODEL_STATES_BYTES // scale)
    (root / "latest").write_text("ds")
    write_file(root / "zero_to_fp32.py", 30_000 // scale)
    write_file(root / "tokenizer.json", TOKENIZER_BYTES // scale)
    pad = "x" * ((STATE_BYTES[0] + STATE_BYTES[1] * world) // scale)  # the cursors and RNG states
    state = {"schema": ckpt.SCHEMA_VERSION, "step": 100, "world_size": world, "pad": pad}
    (root / ckpt.STATE).write_text(json.dumps(state))
    ckpt.write_manifest(root, ckpt.describe_files(root), 100)


def old_full_verify(root: Path) -> int:
    """The verification every rank ran before (trainer/checkpoint.py verify as it was): every file present,
    of its size and hashed. Returns the bytes read."""
    manifest_path = root / ckpt.MANIFEST
    if not manifest_path.is_file():
        raise ckpt.TornCheckpoint(f"checkpoint {root} has no {ckpt.MANIFEST} (save did not finish)")
    files = json.loads(manifest_path.read_text())["files"]
    read = 0
    for rel, meta in files.items():
        path = root / rel
        if not path.is_file():
            raise ckpt.TornCheckpoint(f"checkpoint {root}: file {rel} listed in the manifest is missing")
        if path.stat().st_size != meta["size"]:
            raise ckpt.TornCheckpoint(f"checkpoint {root}: file {rel} has size {path.stat().st_size}")
        if ckpt.sha256_file(path) != meta["sha256"]:
            raise ckpt.TornCheckpoint(f"checkpoint {root}: file {rel} fails its checksum")
        read += meta["size"]
    return read


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    """The best time of ``repeat`` calls (the machine is shared) and the last call's result."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def same_layout(local: Path, state: dict) -> bool:
    """Resumed at the world size and stage it was saved with: no rank converts (reads everything)."""
    return False


def measure(world: int, scale: int, tmp: Path) -> dict:
    root = tmp / f"w{world}" / ckpt.step_dir_name(100)
    t_write, _ = timed(lambda: write_layout(root, world, scale))
    files = ckpt.read_manifest(root)["files"]
    total = sum(f["size"] for f in files.values())
    # bytes every rank hashes under the new scheme, from the manifest (exact for all ranks)
    new_bytes = [sum(files[n]["size"] for n in ckpt.files_for_rank(files, r)) for r in range(world)]
    old_s, old_read = timed(lambda: old_full_verify(root), REPEAT)
    assert old_read == total
    new_s = {}
    for rank in sorted({0, world // 2, world - 1}):
        seconds, part = timed(lambda: verify_part(str(root), tmp / "cache", rank, same_layout), REPEAT)
        assert part.problem is None and part.hashed_bytes == new_bytes[rank], (rank, part.problem)
        new_s[rank] = seconds
    shutil.rmtree(root.parent)
    return {"world": world, "files": len(files), "total": total, "write_s": t_write, "old_s": old_s,
            "old_bytes": total, "new_bytes_max": max(new_bytes), "new_bytes_mean": statistics.mean(new_bytes),
            "new_s_mean": statistics.mean(new_s.values()), "new_s_max": max(new_s.values()),
            "all_ranks_old": total * world, "all_ranks_new": sum(new_bytes)}


def report(rows: list[dict], scale: int) -> None:
    mb = 1e6
    print(f"resume verification per rank, xl flavor, ZeRO-3 layout; sizes / {scale} "
          f"(x{scale} for full scale); times: best of {REPEAT}")
    print(f"{'ranks':>5} {'files':>6} {'ckpt MB':>8} | {'old MB/rank':>11} {'old s/rank':>10} | "
          f"{'new MB/rank':>11} {'new s/rank mean/max':>19} | {'bytes x':>7} {'time x':>6} | "
          f"{'all ranks old GB':>16} {'new GB':>7}")
    for r in rows:
        print(f"{r['world']:>5} {r['files']:>6} {r['total'] / mb:8.1f} | {r['old_bytes'] / mb:11.1f} "
              f"{r['old_s']:10.3f} | {r['new_bytes_max'] / mb:11.2f} "
              f"{r['new_s_mean']:9.3f}/{r['new_s_max']:.3f} | {r['old_bytes'] / r['new_bytes_max']:7.0f} "
              f"{r['old_s'] / r['new_s_max']:6.0f} | {r['all_ranks_old'] / 1e9:16.2f} "
              f"{r['all_ranks_new'] / 1e9:7.2f}")
    print("bytes x, time x: old / new per rank (new: the largest rank's bytes, the slowest sampled rank's "
          "time)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--scale", type=int, default=SCALE, help="every size divided by this")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-resume-verify-") as tmp:
        rows = [measure(w, args.scale, Path(tmp)) for w in args.worlds]
    report(rows, args.scale)
    print(f"({time.monotonic() - started:.0f} s in all, writing included: "
          + ", ".join(f"{r['world']} ranks {r['write_s']:.0f} s" for r in rows) + ")")


if __name__ == "__main__":
    main()
