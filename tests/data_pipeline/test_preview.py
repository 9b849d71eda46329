"""`unimo data preview`: corpus shares of the first samples, as the loader delivers them, and epochs per
corpus."""

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from data_pipeline import build_loader
from data_pipeline.cli import main
from data_pipeline.preview import data_config_from_yaml

WEIGHTS = {"text": {"books": 3.0, "web": 1.0}, "image": {"photos": 0.5, "scenes": 0.3, "icons": 0.2},
           "pair": {"coco": 0.3, "vg": 0.7}}


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    from data_pipeline import write_synthetic_dataset

    root = tmp_path_factory.mktemp("preview")
    a = write_synthetic_dataset(str(root / "a"), n_pairs=40, n_text=40, n_images=40, n_eval=10,
                                samples_per_shard=10, image_size=16, seed=1)
    b = write_synthetic_dataset(str(root / "b"), n_pairs=80, n_text=40, n_images=80, n_eval=10,
                                samples_per_shard=10, image_size=16, seed=2)
    folders = [a, b, a]  # a corpus may share shards with another: its cursor is its own
    data = {src: {"batch_size": 8 if src == "text" else 6,
                  "corpora": [{"name": n, "urls": folders[i][src], "weight": w}
                              for i, (n, w) in enumerate(WEIGHTS[src].items())]} for src in WEIGHTS}
    data.update(tokenizer=a["tokenizer"], num_workers=2, seed=9)
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump({"data": data, "train": {"global_micro_batches": 2, "seq_len": 16},
                                    "stages": [{"name": "s", "steps": 100}]}))
    return str(path)


def test_preview_json_shares_follow_the_weights(config_file, capsys):
    assert main(["preview", config_file, "--samples", "400", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert set(counts) == set(WEIGHTS)
    for src, weights in WEIGHTS.items():
        assert sum(counts[src].values()) == 400
        total = sum(weights.values())
        for name, w in weights.items():
            assert abs(counts[src][name] / 400 - w / total) <= 0.05, (src, name, counts[src])


@pytest.mark.integration  # DataLoader worker processes
def test_preview_counts_are_what_the_loader_delivers(config_file, capsys):
    main(["preview", config_file, "--samples", "96", "--json"])
    counts = json.loads(capsys.readouterr().out)
    cfg, _ = data_config_from_yaml(config_file)
    loader = build_loader(cfg, rank=0, world_size=1, seq_len=16, image_size=16, patch_size=8)
    seen = {src: Counter() for src in WEIGHTS}
    for i, batch in enumerate(loader):
        for src in WEIGHTS:
            seen[src].update(key.split("/", 1)[1]
                             for key in batch["corpus"][src][:96 - sum(seen[src].values())])
        if i + 1 == 16:  # 16 x 6 = 96 image and pair samples
            break
    assert {src: dict(c) for src, c in seen.items()} == counts


def test_preview_prints_epochs_per_corpus(config_file, capsys):
    assert main(["preview", config_file, "--samples", "100"]) == 0
    out = capsys.readouterr().out
    # pairs: 100 steps x 2 micro-batches x 6 = 1200 samples; coco (folder a: 40 pairs in 4 shards of 10, no
    # sidecars) gets 0.3 of them. Without sidecars an epoch's size is the documented estimate: the first
    # shard's 10 samples scaled by the corpus's bytes over that shard's (shard sizes differ with their images)
    shards = sorted((Path(config_file).parent / "a" / "pairs").glob("shard-*.tar"))
    size = 10 * sum(f.stat().st_size for f in shards) / shards[0].stat().st_size
    assert len(shards) == 4 and abs(size - 40) <= 4  # near the true 40
    line = next(row for row in out.splitlines() if row.strip().startswith("coco"))
    assert f"{360 / size:.2f} epochs of ~{round(size)} samples" in line, out
    assert "text: first 100 samples" in out and "sequences" in out


def test_the_shipped_unimo_recipe_has_its_corpora_and_weights():
    from pathlib import Path

    from data_pipeline.accounting import weight_params
    from trainer.config import load_config

    path = Path(__file__).resolve().parents[2] / "configs" / "unimo_recipe.yaml"
    data, _ = data_config_from_yaml(str(path))
    assert load_config(path).data == data  # the typed config tree reads the same data section
    assert [c.name for c in data.pair.corpora] == ["coco", "vg", "cc3m", "sbu"]
    assert [c.name for c in data.text.corpora] == ["bookwiki", "openwebtext"]
    assert [c.name for c in data.image.corpora] == ["openimages", "coco"]
    assert len(data.pair.corpora[2].urls) == 2  # a corpus may span several folders
    params = weight_params(data)
    for modality in ("text", "image", "pair"):
        shares = [float(v) for k, v in params.items() if k.startswith(f"data.weights.{modality}.")]
        assert abs(sum(shares) - 1.0) < 1e-6


def test_the_recipe_shown_in_the_data_docs_is_the_shipped_one():
    """docs/DATA.md shows the recipe's data section as YAML: it must stay the file's."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    doc = (root / "docs" / "DATA.md").read_text()
    section = doc[doc.index("## The UNIMO recipe"):]
    start = section.index("```yaml\n") + len("```yaml\n")
    shown = section[start:section.index("\n```", start)]
    shipped = yaml.safe_load((root / "configs" / "unimo_recipe.yaml").read_text())
    assert yaml.safe_load(shown) == {"data": shipped["data"]}
