"""Shard writers: manifests (jsonl/csv), COCO captions, image folders and text files to WebDataset tars.

Each finished shard gets a sidecar ``shard-NNNNNN.json`` (samples, bytes, skips, the next input index),
written after its tar; a re-run keeps the shards that have one and continues from the last one's next
input index, so an interrupted conversion resumes without rewriting or duplicating anything.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from PIL import Image

from .storage_io import filesystem, safe_url, scrub_urls, storage_error
from .samples import IMAGE_EXTS, BadSample, upright
from .webdataset_tar import TarWriter

log = logging.getLogger("unimo.data")

_IMAGE_SUFFIXES = IMAGE_EXTS + ("bmp", "gif", "tif", "tiff")


@dataclass
class Raw:
    """One input sample; ``load()`` reads its bytes only when its shard is written."""

    source: str                       # where it came from, for messages
    load: Callable[[], dict[str, bytes]]


@dataclass
class Summary:
    shards_written: int = 0
    shards_kept: int = 0              # already complete from an earlier run
    samples: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)

    def to_json(self) -> dict:
        return {"shards_written": self.shards_written, "shards_kept": self.shards_kept,
                "samples": self.samples, "bytes": self.bytes, "skipped": dict(self.skipped)}


# -- reading inputs ---------------------------------------------------------------------------------------

def _read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise BadSample("missing_file", safe_url(url)) from None
    except Exception as exc:  # noqa: BLE001 - any other storage failure stops the run, naming the input
        raise storage_error(url, exc) from None


def _join(root: str, path: str) -> str:
    if "://" in path or path.startswith("/") or not root:
        return path
    return root.rstrip("/") + "/" + path


def _checked_image(data: bytes, resize: int | None) -> tuple[str, bytes]:
    """(extension, bytes) of a decodable image; re-encoded only when resizing or in a format we do not
    read."""
    try:
        img = Image.open(io.BytesIO(data))
        fmt = (img.format or "").lower()
        img.load()
    except Exception as exc:  # noqa: BLE001 - any decoder failure makes the image unusable
        raise BadSample("bad_image", f"{type(exc).__name__}: {exc}") from None
    ext = {"jpeg": "jpg", "mpo": "jpg"}.get(fmt, fmt)
    if ext in IMAGE_EXTS and not (resize and max(img.size) > resize):
        return ext, data  # as it came, its orientation tag too: the reader turns it upright
    img = upright(img).convert("RGB")  # the re-encode below drops the tag: turned here, before resizing
    if resize and max(img.size) > resize:
        img.thumbnail((resize, resize), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return "jpg", buf.getvalue()


def _sample_files(image_url: str | None, captions: list[str], meta: dict, resize: int | None) -> dict:
    files = {}
    if image_url is not None:
        ext, data = _checked_image(_read_bytes(image_url), resize)
        files[ext] = data
    if captions is not None:
        captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
        if not captions:
            raise BadSample("empty_text", "no non-empty caption")
        files["txt"] = captions[0].encode()
        if len(captions) > 1:
            meta = {**meta, "captions": captions}
    if meta:
        files["json"] = json.dumps(meta, ensure_ascii=False).encode()
    return files


_IMAGE_COLS = ("image", "image_path", "url", "file_name", "filepath", "path")
_TEXT_COLS = ("caption", "text", "txt")


def _first(row: dict, cols) -> str | None:
    for c in cols:
        if isinstance(row.get(c), str) and row[c].strip():
            return row[c].strip()
    return None


def manifest_samples(url: str, root: str = "", resize: int | None = None) -> Iterator[Raw]:
    """Rows of a .jsonl or .csv manifest: an image column (image/url/file_name/path) and/or a caption column
    (caption/text); optional captions, phrases, tags, id. Relative image paths are taken from ``root``, else
    from the manifest's folder."""
    root = root or url.rsplit("/", 1)[0]
    fs, path = filesystem(url)
    with fs.open(path, "r", encoding="utf-8") as f:
        rows = (list(csv.DictReader(f)) if url.endswith(".csv")
                else [json.loads(line) for line in f if line.strip()])
    for i, row in enumerate(rows):
        yield Raw(f"{url}:{i + 1}", lambda row=row: _manifest_files(row, root, resize))


def _manifest_files(row: dict, root: str, resize) -> dict:
    image = _first(row, _IMAGE_COLS)
    # A caption column that is present but blank is an empty text (skipped), not an image-only sample.
    caption = next((str(row[c] or "") for c in _TEXT_COLS if c in row), None)
    captions = row.get("captions") if isinstance(row.get("captions"), list) else None
    if image is None and caption is None and not captions:
        raise BadSample("missing_field", "row has no image and no text column")
    meta = {k: row[k] for k in ("phrases", "tags", "id") if k in row and row[k] not in (None, "")}
    texts = (None if caption is None and captions is None
             else [caption] * (caption is not None) + (captions or []))
    if image is None:  # a text-only manifest: documents
        return _doc(texts[0] if texts else None)
    return _sample_files(_join(root, image), texts, meta, resize)


def coco_samples(url: str, root: str = "", resize: int | None = None) -> Iterator[Raw]:
    """COCO captions JSON (images + annotations): one pair per image with all its captions."""
    root = root or url.rsplit("/", 1)[0]
    fs, path = filesystem(url)
    with fs.open(path, "r", encoding="utf-8") as f:
        data = json.load(f)
    captions: dict[int, list[str]] = {}
    for ann in data.get("annotations", []):
        captions.setdefault(ann["image_id"], []).append(ann.get("caption", ""))
    for img in sorted(data.get("images", []), key=lambda im: im["id"]):
        caps = captions.get(img["id"], [])
        yield Raw(f"{url}:image {img['id']}", lambda img=img, caps=caps: _sample_files(
            _join(root, img["file_name"]), caps, {"id": img["id"], "file_name": img["file_name"]}, resize))


def folder_samples(url: str, resize: int | None = None) -> Iterator[Raw]:
    """Images of a folder (recursive, sorted); an image with a same-named .txt beside it becomes a pair."""
    fs, path = filesystem(url)
    files = sorted(fs.find(path))
    texts = {f.rsplit(".", 1)[0]: f for f in files if f.endswith(".txt")}
    proto = url.split("://", 1)[0] + "://" if "://" in url else ""
    for f in files:
        if f.rsplit(".", 1)[-1].lower() not in _IMAGE_SUFFIXES:
            continue
        txt = texts.get(f.rsplit(".", 1)[0])
        yield Raw(proto + f, lambda f=f, txt=txt: _sample_files(
            proto + f, None if txt is None else [_read_bytes(proto + txt).decode("utf-8", "replace")],
            {}, resize))


def text_samples(urls: list[str]) -> Iterator[Raw]:
    """Documents: each .txt file is one; each line of a .jsonl with a "text" field is one."""
    for url in urls:
        if url.endswith(".jsonl"):
            fs, path = filesystem(url)
            with fs.open(path, "r", encoding="utf-8") as f:
                lines = [line for line in f if line.strip()]
            for i, line in enumerate(lines):
                yield Raw(f"{url}:{i + 1}", lambda line=line: _doc(json.loads(line).get("text")))
        else:
            yield Raw(url, lambda url=url: _doc(_read_bytes(url).decode("utf-8", "replace")))


def _doc(text) -> dict:
    if not isinstance(text, str) or not text.strip():
        raise BadSample("empty_text", "empty document")
    return {"txt": text.strip().encode()}


def detect_format(inputs: list[str]) -> str:
    first = inputs[0].rstrip("/")
    if first.endswith(".csv") or (first.endswith(".jsonl") and _looks_like_manifest(first)):
        return "manifest"
    if first.endswith((".jsonl", ".txt")):
        return "text"
    if first.endswith(".json"):
        return "coco"
    return "images"


def _looks_like_manifest(url: str) -> bool:
    fs, path = filesystem(url)
    with fs.open(path, "r", encoding="utf-8") as f:
        row = json.loads(f.readline() or "{}")
    return any(c in row for c in _IMAGE_COLS) or any(c in row for c in ("caption", "captions"))


def input_samples(inputs: list[str], fmt: str = "auto", root: str = "", resize: int | None = None
                  ) -> Iterator[Raw]:
    fmt = detect_format(inputs) if fmt == "auto" else fmt
    if fmt == "text":
        yield from text_samples(inputs)
        return
    for url in inputs:
        if fmt == "manifest":
            yield from manifest_samples(url, root, resize)
        elif fmt == "coco":
            yield from coco_samples(url, root, resize)
        elif fmt == "images":
            yield from folder_samples(url, resize)
        else:
            raise ValueError(f"format {fmt!r}: must be auto, manifest, coco, images or text")


# -- writing shards ---------------------------------------------------------------------------------------

def _existing(out: str, prefix: str) -> list[dict]:
    """Sidecars of the complete shards of an earlier run, in order, up to the first gap."""
    fs, root = filesystem(out)
    done = []
    while True:
        side = f"{root}/{prefix}-{len(done):06d}.json"
        if not fs.exists(side):
            return done
        with fs.open(side, "r") as f:
            done.append(json.load(f))


def write_shards(samples: Iterable[Raw], out: str, *, shard_bytes: int = 256 << 20, max_samples: int = 0,
                 prefix: str = "shard", progress: Callable[[str], None] | None = None) -> Summary:
    """Write ``samples`` as WebDataset shards of about ``shard_bytes`` (or ``max_samples``) under ``out``."""
    progress = progress or log.info
    fs, root = filesystem(out)
    fs.makedirs(root, exist_ok=True)
    summary, done = Summary(), _existing(out, prefix)
    for side in done:
        summary.shards_kept += 1
        summary.samples += side["samples"]
        summary.bytes += side["bytes"]
        summary.skipped.update(side["skipped"])
    start = done[-1]["next_input"] if done else 0
    if done:
        progress(f"{len(done)} shards already complete in {out}; continuing at input {start}")
    it = iter(enumerate(samples))
    index, pending = len(done), None
    for i, raw in it:  # inputs before `start` went into the kept shards
        if i >= start:
            pending = (i, raw)
            break
    while pending is not None:
        pending = _write_one(fs, root, out, prefix, index, pending, it, shard_bytes, max_samples, summary,
                             progress)
        index += 1
    progress(f"done: {summary.samples} samples, {summary.bytes / 1e6:.1f} MB in "
             f"{summary.shards_written + summary.shards_kept} shards ({summary.shards_kept} kept); "
             f"skipped {dict(summary.skipped) or 'none'}")
    with fs.open(f"{root}/_summary.json", "w") as f:
        json.dump(summary.to_json(), f, indent=1)
    return summary


def _write_one(fs, root, out, prefix, index, pending, it, shard_bytes, max_samples, summary, progress):
    """Write one shard starting with ``pending``; returns the first input of the next shard (or None)."""
    name = f"{prefix}-{index:06d}"
    tmp = f"{root}/{name}.tar" if "://" in out and not out.startswith("file://") else f"{root}/{name}.tar.tmp"
    skipped, n, size, t0 = Counter(), 0, 0, time.time()
    with fs.open(tmp, "wb") as f:
        writer = TarWriter(f)
        while pending is not None:
            i, raw = pending
            if n and (size >= shard_bytes or (max_samples and n >= max_samples)):
                break
            try:
                files = raw.load()
                writer.write(f"{i:09d}", files)
                n += 1
                size += sum(512 + -(-len(v) // 512) * 512 for v in files.values())
            except BadSample as skip:
                skipped[skip.reason] += 1
                log.warning("skipped input %s: %s (%s)", scrub_urls(raw.source), skip.reason,
                            scrub_urls(skip))
            pending = next(it, None)
        writer.close()
    if n == 0:  # every remaining input was skipped: no empty shard
        fs.rm(tmp)
        summary.skipped.update(skipped)
        return None
    if tmp.endswith(".tmp"):  # local: the tar appears whole, under its final name
        fs.mv(tmp, f"{root}/{name}.tar")
    size = fs.size(f"{root}/{name}.tar")
    next_input = pending[0] if pending else (i + 1)
    side = {"samples": n, "bytes": size, "skipped": dict(skipped), "next_input": next_input}
    with fs.open(f"{root}/{name}.json", "w") as f:  # written last: its presence marks the shard complete
        json.dump(side, f)
    summary.shards_written += 1
    summary.samples += n
    summary.bytes += size
    summary.skipped.update(skipped)
    progress(f"{name}.tar: {n} samples, {size / 1e6:.1f} MB, {sum(skipped.values())} skipped, "
             f"{time.time() - t0:.1f}s (inputs up to {next_input})")
    return pending
