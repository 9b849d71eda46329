"""Shard writers and the `unimo data` CLI: inputs to shards, skips with reasons, re-runs that keep shards."""

import json
import subprocess
import sys

import pytest

from PIL import Image

from data_pipeline import DataConfig, SourceConfig, build_loader
from data_pipeline.cli import main
from data_pipeline.storage_io import list_shards
from data_pipeline.shard_writer import input_samples, write_shards

from .conftest import BUCKET


def _png(path, colour):
    Image.new("RGB", (24, 24), colour).save(path)


def _manifest(tmp_path, n=12):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rows = []
    for i in range(n):
        _png(imgs / f"{i}.png", (i * 20 % 255, 40, 90))
        rows.append({"image": f"imgs/{i}.png", "caption": f"a blue square number {i}", "tags": ["square"]})
    rows[3]["image"] = "imgs/absent.png"
    (imgs / "5.png").write_bytes(b"\x89PNG broken")
    rows[7]["caption"] = "  "
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_manifest_to_shards_counts_skips_and_reads_back(tmp_path, local_data):
    out = str(tmp_path / "out")
    summary = write_shards(input_samples([_manifest(tmp_path)]), out, max_samples=4)
    assert summary.samples == 9 and summary.shards_written == 3
    assert dict(summary.skipped) == {"missing_file": 1, "bad_image": 1, "empty_text": 1}
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["samples"] == 9
    cfg = DataConfig(pair=SourceConfig(out, 3), tokenizer=local_data["tokenizer"], num_workers=0,
                     shuffle_buffer=1)
    keys = []
    for i, batch in enumerate(build_loader(cfg, rank=0, world_size=1, seq_len=16,
                                           image_size=16, patch_size=8)):
        keys += batch["keys"]["pair"]
        if i == 2:
            break
    assert sorted(k.split("/")[1] for k in keys) == [f"{i:09d}" for i in range(12) if i not in (3, 5, 7)]


def test_rerun_keeps_finished_shards_and_rewrites_the_torn_one(tmp_path):
    manifest, out = _manifest(tmp_path), tmp_path / "out"
    write_shards(input_samples([manifest]), str(out), max_samples=4)
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    (out / "shard-000002.json").unlink()   # a crash after the last tar, before its sidecar
    (out / "shard-000001.tar").write_bytes(b"changed")  # kept shards are not rewritten
    again = write_shards(input_samples([manifest]), str(out), max_samples=4)
    assert again.shards_kept == 2 and again.shards_written == 1 and again.samples == 9
    assert (out / "shard-000002.tar").read_bytes() == before["shard-000002.tar"]
    assert (out / "shard-000001.tar").read_bytes() == b"changed"


def test_shard_size_target(tmp_path):
    summary = write_shards(input_samples([_manifest(tmp_path)]), str(tmp_path / "out"), shard_bytes=3000)
    sizes = [s for _, s in list_shards(str(tmp_path / "out"))]
    assert len(sizes) == summary.shards_written > 2
    assert all(s < 3000 + 4096 + 10240 for s in sizes)  # target + one sample + tar end padding


def test_coco_and_image_folder_inputs(tmp_path):
    _png(tmp_path / "a.png", (255, 0, 0))
    _png(tmp_path / "b.png", (0, 255, 0))
    (tmp_path / "a.txt").write_text("a red image")
    coco = {"images": [{"id": 7, "file_name": "a.png"}, {"id": 9, "file_name": "b.png"}],
            "annotations": [{"image_id": 7, "caption": "red"}, {"image_id": 7, "caption": "all red"},
                            {"image_id": 9, "caption": "green"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    s = write_shards(input_samples([str(tmp_path / "captions.json")]), str(tmp_path / "coco"))
    assert s.samples == 2
    folder = write_shards(input_samples([str(tmp_path)], fmt="images"), str(tmp_path / "folder"))
    assert folder.samples == 2  # a.png becomes a pair (a.txt beside it), b.png an image-only sample
    import tarfile

    with tarfile.open(tmp_path / "coco" / "shard-000000.tar") as tf:
        meta = json.loads(tf.extractfile("000000000.json").read())
        assert meta["captions"] == ["red", "all red"] and meta["id"] == 7
    with tarfile.open(tmp_path / "folder" / "shard-000000.tar") as tf:
        assert sorted(tf.getnames()) == ["000000000.png", "000000000.txt", "000000001.png"]


def test_cli_text_shards_and_tokenizer_on_s3(s3_server, tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": f"the red circle number {i} is large."})
                              for i in range(30)))
    out = f"s3://{BUCKET}/cli/text"
    assert main(["shards", str(docs), "--out", out, "--max-samples", "10"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 30
    assert len(list_shards(out)) == 3
    assert main(["tokenizer", out, "--out", f"s3://{BUCKET}/cli/tok", "--vocab-size", "100"]) == 0
    assert json.loads(capsys.readouterr().out)["vocab_size"] <= 100
    assert main(["inspect", out]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 30


@pytest.mark.integration
def test_cli_errors_are_one_line_and_help_works(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 2
    assert "no shards" in capsys.readouterr().err
    run = subprocess.run([sys.executable, "-m", "data_pipeline.cli", "--help"], capture_output=True,
                         text=True)
    assert run.returncode == 0 and "shards" in run.stdout and "tokenizer" in run.stdout


def test_a_photo_stored_sideways_is_read_and_written_upright():
    """A phone photo stored sideways with an EXIF orientation tag (6: turn 90 degrees clockwise) is seen
    upright, as its caption describes it: decoded for training, and resized by `unimo data shards` (whose
    re-encode drops the tag). Both used to keep the stored, sideways pixels."""
    import io

    import numpy as np
    from PIL import Image

    from data_pipeline.samples import decode_image
    from data_pipeline.shard_writer import _checked_image

    stored = Image.new("RGB", (64, 32), (0, 0, 255))  # wide as stored: red on its left half
    stored.paste((255, 0, 0), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="PNG", exif=exif)
    upright = decode_image(buf.getvalue(), 32)  # turned clockwise: red on top
    assert upright[:8, :, 0].mean() > 200 and upright[-8:, :, 2].mean() > 200
    _, written = _checked_image(buf.getvalue(), resize=48)
    seen = np.asarray(Image.open(io.BytesIO(written)).convert("RGB"))
    assert seen.shape[:2] == (48, 24) and seen[:8, :, 0].mean() > 200  # tall, red on top
    plain = io.BytesIO()
    stored.save(plain, format="PNG")
    assert decode_image(plain.getvalue(), 32)[:, :8, 0].mean() > 200  # untagged: as stored, red on the left
