"""Config validation, flavor registry and the import rule of model/."""

import dataclasses
import pathlib
import re

import pytest

from model.config import FusionConfig, ModelConfig, TextConfig, VisionConfig, config_to_dict
from model.flavors import FLAVORS, get_flavor

MODEL_DIR = pathlib.Path(__file__).resolve().parents[2] / "model"


def test_defaults_are_the_debug_flavor():
    assert ModelConfig() == get_flavor("debug")
    cfg = ModelConfig()
    assert (cfg.text.layers, cfg.text.dim, cfg.vision.image_size, cfg.vision.patch_size) == (2, 64, 32, 8)
    assert (cfg.fusion.layers, cfg.text.vocab_size, cfg.fusion.cross_layer) == (2, 1024, "adaptive")


def test_fields_are_plain_types():
    plain = (int, float, str, bool)

    def walk(obj):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v)
            else:
                assert isinstance(v, plain), f"{type(obj).__name__}.{f.name}"

    for name in FLAVORS:
        walk(get_flavor(name))


def test_get_flavor_fresh_copy_and_unknown():
    a = get_flavor("base")
    a.fusion.layers = 1
    assert get_flavor("base").fusion.layers == 6
    assert get_flavor("base").flavor == "base"
    with pytest.raises(ValueError) as e:
        get_flavor("gigantic")
    assert all(n in str(e.value) for n in ("debug", "small", "base", "large", "xl"))


def test_flavor_sizes():
    b, lg = get_flavor("base"), get_flavor("large")
    assert (b.text.layers, b.text.dim, b.vision.patch_size, b.fusion.layers, b.text.vocab_size) == \
        (12, 768, 16, 6, 30522)
    assert (lg.text.layers, lg.vision.dim, lg.vision.patch_size, lg.fusion.dim) == (24, 1024, 14, 1024)


@pytest.mark.parametrize("build,field,value", [
    (lambda: TextConfig(dim=65), "dim", "65"),
    (lambda: TextConfig(layers=0), "layers", "0"),
    (lambda: TextConfig(dropout=1.5), "dropout", "1.5"),
    (lambda: TextConfig(activation="swish"), "activation", "swish"),
    (lambda: TextConfig(eos_token_id=5000), "eos_token_id", "5000"),
    (lambda: VisionConfig(image_size=30), "image_size", "30"),
    (lambda: FusionConfig(cross_layer="dense"), "cross_layer", "dense"),
    (lambda: FusionConfig(cross_level_attention="yes"), "cross_level_attention", "yes"),
    (lambda: ModelConfig(embed_dim=-1), "embed_dim", "-1"),
])
def test_validation_names_field_value_rule(build, field, value):
    with pytest.raises(ValueError) as e:
        build()
    msg = str(e.value)
    assert field in msg and value in msg and "must" in msg


def test_nested_dicts_are_accepted():
    cfg = ModelConfig(text={"layers": 3}, fusion={"cross_layer": "gated"})
    assert isinstance(cfg.text, TextConfig) and cfg.text.layers == 3 and cfg.fusion.cross_layer == "gated"
    d = config_to_dict(cfg)
    assert d["text"]["layers"] == 3 and ModelConfig(**d) == cfg


def test_model_imports_nothing_forbidden():
    forbidden = re.compile(r"^\s*(import|from)\s+(deepspeed|ray|mlflow|boto3|botocore|s3fs|fsspec|webdataset"
                           r"|torch\.distributed|transformers)\b", re.MULTILINE)
    files = sorted(MODEL_DIR.glob("*.py"))
    assert len(files) >= 10
    sneaky = re.compile(r"^\s*from\s+torch\s+import\s+.*\bdistributed\b|import_module\(", re.MULTILINE)
    bad = {f.name: forbidden.findall(f.read_text()) + sneaky.findall(f.read_text()) for f in files}
    assert not any(bad.values()), bad
    for f in files:  # each file starts with a one-line docstring
        assert f.read_text().lstrip().startswith('"""'), f.name
