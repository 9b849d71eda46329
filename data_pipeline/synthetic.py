"""A small, learnable captioned world of coloured shapes, written as WebDataset shards plus a tokenizer."""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .storage_io import filesystem
from .webdataset_tar import TarWriter
from .tokenizer import save_tokenizer, train_tokenizer


# The world is kept easy on purpose, so that the demo's tiny model (300 steps on 2 CPU cores) visibly learns
# to name shapes (docs/LEARNING.md, "Shapes, session 16: an easier world"). Three colours, not six: a
# caption's colour no longer tells its image from most others in a batch. Every shape sits on a GRID x GRID
# board of cells, which at the debug model's 48 px input are its 8 px patches, so a shape's outline looks the
# same in every patch it covers, wherever it is. With six colours and free positions the model named colours,
# not shapes. This makes the demo easier, not the model better.
PALETTE = {"red": (220, 40, 40), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square", "triangle")
GRID = 6                                            # cells per image side
SIZES = {"small": 1, "large": 2}                    # a shape's side in cells: one cell, or 2 x 2
COUNTS = {1: "a", 2: "two", 3: "three"}
REGIONS = {"left": (0, 0, 3, 6), "right": (3, 0, 6, 6),   # x0, y0, x1, y1 in cells
           "top": (0, 0, 6, 3), "bottom": (0, 3, 6, 6)}
WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
_SPLITS = {"pair": 1, "text": 2, "image": 3, "eval": 4}


def world_version() -> str:
    """A digest of this generator's source: data written by another version of the world is not reused
    (`unimo demo`'s data folder, bench/learn.py's cache)."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def _scene(rng: np.random.Generator) -> list[dict]:
    """One or two groups of identical shapes, each in its own half of the canvas."""
    layout = ("left", "right") if rng.random() < 0.5 else ("top", "bottom")
    if rng.random() < 0.5:
        layout = layout[::-1]
    n_groups = 1 + int(rng.random() < 0.7)
    colours = rng.permutation(list(PALETTE))[:n_groups]
    return [{"count": int(rng.integers(1, 4)), "size": str(rng.choice(list(SIZES))),
             "colour": str(colours[i]), "shape": str(rng.choice(SHAPES)), "where": layout[i]}
            for i in range(n_groups)]


def _group_phrase(g: dict, with_size: bool = True) -> str:
    noun = g["shape"] + ("s" if g["count"] > 1 else "")
    return " ".join([COUNTS[g["count"]], *([g["size"]] if with_size else []), g["colour"], noun])


def _captions(scene: list[dict], rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Several captions of one scene and its concept phrases."""
    full = [f"{_group_phrase(g)} {WHERE[g['where']]}" for g in scene]
    short = [_group_phrase(g, with_size=False) for g in scene]
    be = "there are " if len(scene) > 1 or scene[0]["count"] > 1 else "there is "
    caps = [" and ".join(full), be + " and ".join(short), "a picture of " + ", with ".join(full)]
    if len(scene) > 1:
        caps.append(" and ".join(reversed(full)))
    order = rng.permutation(len(caps))
    phrases = [_group_phrase(g) for g in scene] + short + [WHERE[g["where"]].split(" ", 1)[1] for g in scene]
    return [caps[i] for i in order], phrases


@functools.cache
def _layouts(where: str, k: int, count: int) -> list[tuple[tuple[int, int], ...]]:
    """Every way to put ``count`` shapes of k x k cells inside a half without overlap (top-left cells)."""
    x0, y0, x1, y1 = REGIONS[where]
    spots = [(x, y) for y in range(y0, y1 - k + 1) for x in range(x0, x1 - k + 1)]
    return [c for c in itertools.combinations(spots, count)
            if all(abs(a[0] - b[0]) >= k or abs(a[1] - b[1]) >= k for a, b in itertools.combinations(c, 2))]


def _cells(g: dict, rng: np.random.Generator) -> tuple[tuple[int, int], ...]:
    """The top-left cells of a group's shapes, drawn uniformly among every placement in its half (three large
    shapes fit a half only in a row)."""
    layouts = _layouts(g["where"], SIZES[g["size"]], g["count"])
    return layouts[int(rng.integers(len(layouts)))]


def _draw(scene: list[dict], size: int, rng: np.random.Generator) -> Image.Image:
    tint = rng.integers(200, 240, size=3)
    img = Image.new("RGB", (size, size), tuple(int(t) for t in tint))
    draw = ImageDraw.Draw(img)
    cell = size / GRID
    for g in scene:
        side = SIZES[g["size"]] * cell
        for x, y in _cells(g, rng):
            # PIL's boxes include their right and bottom edges: one pixel less keeps a shape inside its cells
            left, top, right, bottom = x * cell, y * cell, x * cell + side - 1, y * cell + side - 1
            colour = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in PALETTE[g["colour"]])
            if g["shape"] == "circle":
                draw.ellipse((left, top, right, bottom), fill=colour)
            elif g["shape"] == "square":
                draw.rectangle((left, top, right, bottom), fill=colour)
            else:
                draw.polygon([((left + right) / 2, top), (left, bottom), (right, bottom)], fill=colour)
    return img


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt],
             **({"quality": 90} if fmt == "jpg" else {}))
    return buf.getvalue()


def _sentences(rng: np.random.Generator) -> str:
    """An unpaired text document: sentences about the same world."""
    out = []
    for _ in range(int(rng.integers(3, 9))):
        g = _scene(rng)[0]
        kind = int(rng.integers(4))
        if kind == 0:
            out.append(f"{_group_phrase(g)} {WHERE[g['where']]}.")
        elif kind == 1:
            out.append(f"the {g['colour']} {g['shape']} is {g['size']}.")
        elif kind == 2:
            other = str(rng.choice([s for s in SHAPES if s != g["shape"]]))
            out.append(f"a {g['colour']} {g['shape']} is next to a {other}.")
        else:
            out.append(f"{_group_phrase(g, with_size=False)} are {WHERE[g['where']]} of the picture."
                       if g["count"] > 1 else f"there is {_group_phrase(g)} {WHERE[g['where']]}.")
    return " ".join(out)


def _pair_sample(i: int, rng, image_size: int, base_id: int) -> tuple[dict[str, bytes], list[str]]:
    scene = _scene(rng)
    caps, phrases = _captions(scene, rng)
    tags = sorted({g["shape"] for g in scene} | {g["colour"] for g in scene})
    meta = {"captions": caps, "phrases": phrases, "tags": tags, "id": base_id + i,
            "width": image_size, "height": image_size}
    return {"jpg": _encode(_draw(scene, image_size, rng), "jpg"), "txt": caps[0].encode(),
            "json": json.dumps(meta).encode()}, caps


def _image_sample(i: int, rng, image_size: int, base_id: int) -> tuple[dict[str, bytes], list[str]]:
    scene = _scene(rng)
    meta = {"id": base_id + i, "tags": sorted({g["shape"] for g in scene} | {g["colour"] for g in scene})}
    return {"png": _encode(_draw(scene, image_size, rng), "png"), "json": json.dumps(meta).encode()}, []


def _text_sample(i: int, rng, image_size: int, base_id: int) -> tuple[dict[str, bytes], list[str]]:
    doc = _sentences(rng)
    return {"txt": doc.encode()}, [doc]


def _write_split(out: str, folder: str, make, n: int, per_shard: int, image_size: int, seed: int,
                 split: str, progress=None) -> tuple[str, list[str]]:
    rng = np.random.default_rng([seed, _SPLITS[split]])
    fs, root = filesystem(out.rstrip("/") + "/" + folder)
    fs.makedirs(root, exist_ok=True)
    texts, n_shards = [], max(1, -(-n // per_shard))
    for s in range(n_shards):
        with fs.open(f"{root}/shard-{s:06d}.tar", "wb") as f:
            writer = TarWriter(f)
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                files, sample_texts = make(i, rng, image_size, _SPLITS[split] * 10_000_000)
                writer.write(f"{i:09d}", files)
                texts.extend(sample_texts)
                if progress is not None:
                    progress(1)
            writer.close()
    url = out.rstrip("/") + f"/{folder}/shard-{{{0:06d}..{n_shards - 1:06d}}}.tar"
    return url, texts


def write_synthetic_dataset(out: str, *, n_pairs=2000, n_text=2000, n_images=2000, n_eval=200,
                            samples_per_shard=250, image_size=64, seed=0, progress=None) -> dict[str, str]:
    """Write pairs, unpaired text, unpaired images, held-out pairs and a tokenizer under ``out``.

    Returns {"pair", "text", "image", "eval": brace-pattern URLs, "tokenizer": tokenizer.json path}.
    Deterministic for a seed; ``out`` is a local folder or s3://bucket/prefix. ``progress(n)`` is told of
    every n samples written (of n_pairs + n_text + n_images + n_eval).
    """
    urls, corpus = {}, []
    for split, folder, make, n in (("pair", "pairs", _pair_sample, n_pairs),
                                   ("text", "text", _text_sample, n_text),
                                   ("image", "images", _image_sample, n_images),
                                   ("eval", "eval", _pair_sample, n_eval)):
        if n <= 0:
            continue
        urls[split], texts = _write_split(out, folder, make, n, samples_per_shard, image_size, seed, split,
                                          progress)
        corpus.extend(texts)
    # Every word of the world is in the corpus, so the vocabulary stays far below the debug model's 1024.
    tok = train_tokenizer(corpus or ["empty"], vocab_size=1000)
    urls["tokenizer"] = save_tokenizer(tok, out.rstrip("/") + "/tokenizer/tokenizer.json")
    return urls
