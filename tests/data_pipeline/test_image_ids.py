"""Image ids tell images apart across every corpus a batch mixes (data_pipeline/samples.py image_ids_of).

ITC counts two rows with one id as the same image (a positive), ITM's negatives and the rewrites avoid it. Two
corpora numbered alike (COCO's and Visual Genome's ids from 1; two folders written by `unimo data shards` or
the synthetic writer, `shard-000000.tar` with the same keys) used to share ids between different images."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from data_pipeline.samples import Prep, shard_items
from data_pipeline.storage_io import RetryingReader, RetryPolicy, list_shards
from data_pipeline.synthetic import write_synthetic_dataset


def _ids(corpus: str, urls: str, source: str = "pair") -> list[int]:
    prep = Prep(16, 16, None)
    ids = []
    for shard, _ in list_shards(urls):
        with RetryingReader(shard, RetryPolicy()) as reader:
            ids += [item["image_id"] for _, item in shard_items(source, shard, reader, prep, lambda n: None,
                                                                lambda o: True, corpus=corpus)]
    return ids


def _tar(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, files in samples.items():
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_two_corpora_with_the_same_metadata_ids_get_apart_ids(tmp_path):
    a = write_synthetic_dataset(str(tmp_path / "a"), n_pairs=12, n_text=0, n_images=12, n_eval=0,
                                samples_per_shard=6, image_size=16, seed=1)
    b = write_synthetic_dataset(str(tmp_path / "b"), n_pairs=12, n_text=0, n_images=12, n_eval=0,
                                samples_per_shard=6, image_size=16, seed=2)
    for source in ("pair", "image"):
        first, second = _ids(f"{source}/a", a[source], source), _ids(f"{source}/b", b[source], source)
        assert len(set(first)) == len(first) == 12 and len(set(second)) == 12
        assert not set(first) & set(second), source
        assert _ids(f"{source}/a", a[source], source) == first  # the same every time (resumes, ranks)


def test_captions_of_one_image_share_its_id_and_shards_without_ids_are_told_apart(tmp_path):
    image = _png()
    meta = {"id": 7}
    same_layout = {"000000000": {"png": image, "txt": b"a red square"},
                   "000000001": {"png": image, "txt": b"a red square again"}}
    for folder in ("part-a", "part-b"):  # one corpus over two folders whose shards and keys are named alike
        _tar(tmp_path / folder / "shard-000000.tar", same_layout)
    _tar(tmp_path / "coco" / "shard-000000.tar",
         {"000000000": {"png": image, "txt": b"red", "json": json.dumps(meta).encode()},
          "000000001": {"png": image, "txt": b"all red", "json": json.dumps(meta).encode()}})
    no_ids = _ids("pair/cc", str(tmp_path / "part-a")) + _ids("pair/cc", str(tmp_path / "part-b"))
    assert len(set(no_ids)) == 4
    coco = _ids("pair/coco", str(tmp_path / "coco"))
    assert coco[0] == coco[1] and coco[0] not in no_ids
