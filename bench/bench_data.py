"""Data pipeline throughput from an S3 server on loopback: unimo's pipeline vs raw boto3 and plain webdataset.

Three readers of the same pair shards, in the same run:
  raw        boto3 get_object of every shard (bytes only): the ceiling the storage allows;
  reference  the common way: webdataset (s3 opened through fsspec) + PIL decode/resize + normalise + tokenise
             the caption + .batched(), in a DataLoader with the same workers;
  unimo      data_pipeline.build_loader on the pair source, serving every pair objective (decode, tokenise,
             whole-phrase MLM masks, rewritten hard negative, extra positive, concept ids, exact cursor).
Each is timed after a warm-up batch; readers alternate for --repeats rounds and the best round counts, since
other work on the machine only ever slows a round down. Samples per CPU-second of each reader's processes are
reported too: on a shared machine they move far less than wall-clock rates.

    .venv/bin/python bench/bench_data.py [--pairs 2000] [--stored-size 256] [--image-size 128] [--workers 2]
                                         [--objectives itc,mlm_pair | '']

With ``--corpora N`` it measures instead what several weighted corpora cost, on the same shards throughout:
  one        one corpus of all the shards;
  N corpora  the shards dealt into N corpora with weights 1..N (every sample still decoded the same way);
  memory     the resident memory (USS) of each DataLoader worker with 1, 2, 4 .. N corpora;
  gzip       one corpus of the same shards gzipped (.tar.gz) vs plain: samples/s and CPU-seconds per sample.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.objective_registry import names_of  # noqa: E402 (after the path set-up)

BUCKET = "bench-data"
# Every objective that reads pairs: the unimo side builds all a cross-modal training step reads.
PAIR_OBJECTIVES = names_of("pair")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3() -> subprocess.Popen:
    """moto's S3 server in its own process (a thread would share the GIL with the process being measured)."""
    port = _free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto_server did not start")


def raw_fetch(urls: list[str], workers: int) -> tuple[float, int]:
    """Seconds to GET every shard with ``workers`` threads, and the bytes fetched."""
    import boto3

    client = boto3.client("s3")

    def get(url):
        bucket, key = url[5:].split("/", 1)
        return len(client.get_object(Bucket=bucket, Key=key)["Body"].read())

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        total = sum(pool.map(get, urls))
    return time.perf_counter() - t0, total


def unimo_loader(urls: dict, args, corpora: list | None = None):
    from data_pipeline import DataConfig, SourceConfig, build_loader

    pair = (SourceConfig(corpora=corpora, batch_size=args.batch) if corpora
            else SourceConfig(urls["pair"], args.batch))
    cfg = DataConfig(pair=pair, tokenizer=urls["tokenizer"], num_workers=args.workers, shuffle_buffer=64)
    return build_loader(cfg, rank=0, world_size=1, seq_len=args.seq_len, image_size=args.image_size,
                        patch_size=16, objectives=args.objectives.split(",") if args.objectives else None)


def reference_loader(urls: dict, args):
    """The common way: webdataset + PIL + the usual transforms, s3 opened through fsspec."""
    import importlib

    import fsspec
    import numpy as np
    import torch
    import webdataset as wds
    from PIL import Image
    from tokenizers import Tokenizer
    from torch.utils.data import DataLoader

    gopen = importlib.import_module("webdataset.gopen")  # the package re-exports a function of that name
    gopen.gopen_schemes["s3"] = lambda url, mode="rb", bufsize=8192, **kw: fsspec.open(url, mode).open()
    tok = Tokenizer.from_file(urls["tokenizer"]) if "://" not in urls["tokenizer"] else \
        Tokenizer.from_str(fsspec.open(urls["tokenizer"], "r").open().read())
    size, seq_len = args.image_size, args.seq_len

    def transform(sample):
        img, caption = sample
        img = img.convert("RGB").resize((size, size), Image.BILINEAR)  # Resize
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255)  # ToTensor
        x = x.sub(0.5).div(0.5)  # Normalize(0.5, 0.5)
        ids = tok.encode(caption).ids[:seq_len]
        return x, torch.tensor(ids + [0] * (seq_len - len(ids)))

    def collate(batch):
        return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])

    ds = (wds.WebDataset(urls["pair_list"], shardshuffle=False, repeat=True, empty_check=False)
          .shuffle(64).decode("pil").to_tuple("jpg", "txt").map(transform)
          .batched(args.batch, collation_fn=collate))
    return DataLoader(ds, batch_size=None, num_workers=args.workers)


def _cpu_seconds(skip: int) -> dict[int, float]:
    """CPU seconds (user + system) so far of this process and of each live child but ``skip`` (the S3
    server)."""
    import psutil

    me = psutil.Process()
    out = {}
    for proc in [me, *me.children(recursive=True)]:
        if proc.pid != skip:
            try:
                t = proc.cpu_times()
                out[proc.pid] = t.user + t.system
            except psutil.NoSuchProcess:
                pass
    return out


def rate(loader, batches: int, batch: int, server_pid: int) -> tuple[float, float]:
    """Samples per second, and samples per CPU-second of the reader's processes (this one and its DataLoader
    workers), over ``batches`` batches after one warm-up batch (worker start-up excluded). The CPU figure
    hardly moves with the load other jobs put on the machine; the wall-clock one does."""
    it = iter(loader)
    next(it)
    cpu0, t0 = _cpu_seconds(server_pid), time.perf_counter()
    for _ in range(batches):
        next(it)
    dt, cpu1 = time.perf_counter() - t0, _cpu_seconds(server_pid)
    del it
    cpu = sum(cpu1[pid] - cpu0[pid] for pid in cpu1.keys() & cpu0.keys())
    return batches * batch / dt, batches * batch / cpu


def _worker_uss_mb(skip: int) -> list[float]:
    """Unique resident memory (MB) of each child process but ``skip``: the DataLoader workers."""
    import psutil

    out = []
    for proc in psutil.Process().children(recursive=True):
        if proc.pid != skip:
            try:
                out.append(round(proc.memory_full_info().uss / 1e6, 1))
            except psutil.NoSuchProcess:
                pass
    return out


def rate_and_memory(loader, batches: int, batch: int, server_pid: int) -> tuple[float, float, list[float]]:
    """``rate`` plus the workers' memory at the end of the run (their buffers and open shards filled)."""
    it = iter(loader)
    next(it)
    cpu0, t0 = _cpu_seconds(server_pid), time.perf_counter()
    for _ in range(batches):
        next(it)
    dt, cpu1 = time.perf_counter() - t0, _cpu_seconds(server_pid)
    mem = _worker_uss_mb(server_pid)
    del it
    cpu = sum(cpu1[pid] - cpu0[pid] for pid in cpu1.keys() & cpu0.keys())
    return batches * batch / dt, batches * batch / cpu, mem


def _dealt(shards: list[str], n: int) -> list[dict]:
    """The shards dealt into n corpora with weights 1..n (so the mix is uneven)."""
    return [{"name": f"c{i}", "urls": shards[i::n], "weight": float(i + 1)} for i in range(n)]


def _gzip_copies(shards: list[str]) -> list[str]:
    import gzip

    import fsspec

    out = []
    for url in shards:
        gz = url.replace("/bench/", "/bench-gz/")[:-4] + ".tar.gz"
        with fsspec.open(url, "rb") as src, fsspec.open(gz, "wb") as dst:
            dst.write(gzip.compress(src.read(), compresslevel=6))
        out.append(gz)
    return out


def corpora_bench(urls: dict, shards: list[str], args, server_pid: int) -> dict:
    """One corpus vs --corpora weighted corpora of the same shards; worker memory by corpus count; gzip vs
    plain."""
    gz = _gzip_copies(shards)
    counts = sorted({1, *(2 ** k for k in range(1, 8) if 2 ** k < args.corpora), args.corpora})
    variants = {"one": None, f"{args.corpora}_corpora": _dealt(shards, args.corpora),
                "gzip_one": [{"name": "gz", "urls": gz, "weight": 1.0}]}
    wall, per_cpu, memory = {k: [] for k in variants}, {k: [] for k in variants}, {}
    for _ in range(args.repeats):
        for name, corpora in variants.items():
            w, c, _ = rate_and_memory(unimo_loader(urls, args, corpora), args.batches, args.batch, server_pid)
            wall[name].append(w)
            per_cpu[name].append(c)
    for n in counts:
        _, _, mem = rate_and_memory(unimo_loader(urls, args, _dealt(shards, n) if n > 1 else None),
                                    args.batches, args.batch, server_pid)
        memory[n] = mem
    best = {k: max(v) for k, v in wall.items()}
    best_cpu = {k: max(v) for k, v in per_cpu.items()}
    many = f"{args.corpora}_corpora"
    return {"samples_per_s": {k: round(v, 1) for k, v in best.items()},
            "samples_per_cpu_s": {k: round(v, 1) for k, v in best_cpu.items()},
            "all_rounds": {k: [round(x, 1) for x in v] for k, v in wall.items()},
            "corpora_vs_one": round(best[many] / best["one"], 3),
            "corpora_vs_one_per_cpu_s": round(best_cpu[many] / best_cpu["one"], 3),
            "gzip_vs_plain": round(best["gzip_one"] / best["one"], 3),
            "cpu_ms_per_sample": {"plain": round(1000 / best_cpu["one"], 2),
                                  "gzip": round(1000 / best_cpu["gzip_one"], 2)},
            "worker_uss_mb_by_corpora": memory}


def profile_unimo(urls: dict, args) -> None:
    """cProfile of unimo's pair loader read in this process (num_workers=0, torch on one thread as in a
    worker): the per-sample costs by function, without the DataLoader's process boundary."""
    import cProfile
    import pstats

    import torch

    torch.set_num_threads(1)
    args.workers = 0
    it = iter(unimo_loader(urls, args))
    next(it)
    with cProfile.Profile() as prof:
        for _ in range(args.profile):
            next(it)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(40)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=2000)
    p.add_argument("--samples-per-shard", type=int, default=250)
    p.add_argument("--stored-size", type=int, default=256, help="side of the stored JPEGs")
    p.add_argument("--image-size", type=int, default=128, help="side the pipelines resize to")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--objectives", default=",".join(PAIR_OBJECTIVES),
                   help="comma-separated objectives the unimo batches serve ('' = every batch part)")
    p.add_argument("--corpora", type=int, default=0, metavar="N",
                   help="instead of comparing: N weighted corpora vs one of the same shards, "
                        "memory, gzip vs plain")
    p.add_argument("--profile", type=int, default=0, metavar="BATCHES",
                   help="instead of comparing: cProfile unimo's loader in-process over this many batches")
    args = p.parse_args(argv)

    server = start_s3()
    try:
        import boto3

        from data_pipeline.storage_io import list_shards
        from data_pipeline.synthetic import write_synthetic_dataset

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        urls = write_synthetic_dataset(f"s3://{BUCKET}/bench", n_pairs=args.pairs, n_text=0, n_images=0,
                                       n_eval=0, samples_per_shard=args.samples_per_shard,
                                       image_size=args.stored_size)
        shards = list_shards(urls["pair"])
        urls["pair_list"] = [u for u, _ in shards]
        if args.profile:
            profile_unimo(urls, args)
            return 0
        if args.corpora:
            if len(shards) < args.corpora * max(1, args.workers):
                raise SystemExit(f"--corpora {args.corpora} needs {args.corpora * max(1, args.workers)} "
                                 f"shards (every corpus one per worker); lower --samples-per-shard")
            report = corpora_bench(urls, urls["pair_list"], args, server.pid)
            report["setup"] = {**vars(args), "shards": len(shards), "cpus": os.cpu_count(),
                               "load_average": os.getloadavg()}
            print(json.dumps(report, indent=1))
            return 0
        results = {"raw": [], "reference": [], "unimo": []}
        per_cpu = {"reference": [], "unimo": []}
        for _ in range(args.repeats):
            seconds, nbytes = raw_fetch(urls["pair_list"], args.workers)
            results["raw"].append(args.pairs / seconds)
            for name, make in (("reference", reference_loader), ("unimo", unimo_loader)):
                wall, cpu = rate(make(urls, args), args.batches, args.batch, server.pid)
                results[name].append(wall)
                per_cpu[name].append(cpu)
        best = {k: max(v) for k, v in results.items()}
        best_cpu = {k: max(v) for k, v in per_cpu.items()}
        report = {"setup": {**vars(args), "shards": len(shards), "bytes": nbytes, "cpus": os.cpu_count(),
                            "load_average": os.getloadavg()},
                  "samples_per_s": {k: round(v, 1) for k, v in best.items()},
                  "samples_per_cpu_s": {k: round(v, 1) for k, v in best_cpu.items()},
                  "all_rounds": {k: [round(x, 1) for x in v] for k, v in results.items()},
                  "all_rounds_per_cpu_s": {k: [round(x, 1) for x in v] for k, v in per_cpu.items()},
                  "unimo_vs_reference": round(best["unimo"] / best["reference"], 3),
                  "unimo_vs_reference_per_cpu_s": round(best_cpu["unimo"] / best_cpu["reference"], 3),
                  "unimo_vs_raw": round(best["unimo"] / best["raw"], 4),
                  "raw_MB_per_s": round(nbytes / 1e6 * best["raw"] / args.pairs, 1)}
        print(json.dumps(report, indent=1))
        print(f"unimo {best['unimo']:.0f} samples/s = {report['unimo_vs_reference']:.2f}x reference "
              f"({best['reference']:.0f}/s), {100 * report['unimo_vs_raw']:.1f}% of raw boto3 fetch "
              f"({best['raw']:.0f}/s); per CPU-second {best_cpu['unimo']:.0f} vs {best_cpu['reference']:.0f} "
              f"= {report['unimo_vs_reference_per_cpu_s']:.2f}x")
    finally:
        server.terminate()
        server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
