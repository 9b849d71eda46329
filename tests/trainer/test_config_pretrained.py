"""model.text_init / model.vision_init shape the towers from the folders' config.json; the text folder's
tokenizer becomes the run's, and special-token ids come from the tokenizer file, never from a hard-coded list.
Folders are written by `transformers` itself (random weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.config import load_config
from trainer.config_loader import ConfigError

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from data_pipeline.tokenizer import save_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("hf")
    tok = train_tokenizer(["a red circle on the left", "two blue squares at the top"], vocab_size=60)
    bert = root / "bert"
    transformers.BertModel(transformers.BertConfig(vocab_size=tok.vocab_size, max_position_embeddings=40,
                                                   **TINY)).save_pretrained(bert)
    save_tokenizer(tok, str(bert / "tokenizer.json"))
    vit = root / "vit"
    transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, **TINY)).save_pretrained(vit)
    clip = root / "clip"
    text = {"vocab_size": 99, "num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 4,
            "intermediate_size": 48}
    transformers.CLIPModel(transformers.CLIPConfig(text_config=text, projection_dim=16, vision_config={
        "image_size": 32, "patch_size": 8, **TINY})).save_pretrained(clip)
    other = root / "other_tokenizer.json"
    save_tokenizer(train_tokenizer(["something else entirely"], vocab_size=40), str(other))
    return {"bert": str(bert), "vit": str(vit), "clip": str(clip), "tok": tok, "other": str(other)}


def test_towers_take_their_shapes_and_tokenizer_from_the_folders(folders):
    cfg = load_config(None, [f"model.text_init={folders['bert']}", f"model.vision_init={folders['vit']}"])
    t, v = cfg.model.text, cfg.model.vision
    assert (t.vocab_size, t.layers, t.dim, t.heads, t.mlp_dim, t.max_positions) == (folders["tok"].vocab_size,
                                                                                    2, 32, 4, 48, 40)
    assert (v.image_size, v.patch_size, v.layers, v.dim, v.heads, v.mlp_dim) == (32, 8, 2, 32, 4, 48)
    # the folder's tokenizer is the run's
    assert cfg.data.tokenizer == str(Path(folders["bert"]) / "tokenizer.json")
    tok = folders["tok"]
    assert (t.pad_token_id, t.bos_token_id, t.eos_token_id, t.mask_token_id) == (tok.pad_id, tok.cls_id,
                                                                                 tok.sep_id, tok.mask_id)
    # the model built from this config loads both folders' weights as they are
    from model.unimo import UnimoModel

    model = UnimoModel(cfg.model).eval()
    hf = transformers.ViTModel.from_pretrained(folders["vit"]).eval()
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model.encode_image(px)[-1] - hf(pixel_values=px).last_hidden_state).abs().max() < 1e-5


def test_one_clip_folder_inits_the_vision_tower_and_is_refused_for_text(folders):
    cfg = load_config(None, [f"model.vision_init={folders['clip']}", "model.vision.image_size=48"])
    v = cfg.model.vision
    assert v.pre_layernorm and not v.patch_bias and v.activation == "quick_gelu" and v.dim == 32
    assert v.image_size == 48  # positions are interpolated: the image size may differ from the folder's
    with pytest.raises(ConfigError, match=r"model.text_init=.*clip is a CLIP folder"):
        load_config(None, [f"model.text_init={folders['clip']}"])


def test_settings_that_conflict_with_the_folder_are_an_error_naming_them(folders):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"model.text_init={folders['bert']}", "model.text.heads=8", "model.text.dim=32"])
    msg = str(err.value)
    assert ("model.text.heads=8 (the folder has 4)" in msg and "model.text_init=" in msg
            and "text.dim" not in msg)
    with pytest.raises(ConfigError, match=r"model.vision.patch_size=16 \(the folder has 8\)"):
        load_config(None, [f"model.vision_init={folders['vit']}", "model.vision.patch_size=16"])
    with pytest.raises(ConfigError, match="differs from model.text_init's tokenizer"):
        load_config(None, [f"model.text_init={folders['bert']}", f"data.tokenizer={folders['other']}"])


def test_special_ids_come_from_the_tokenizer_file(tmp_path):
    from data_pipeline.tokenizer import save_tokenizer, train_tokenizer

    tok = train_tokenizer(["a red circle"], vocab_size=40)
    path = save_tokenizer(tok, str(tmp_path / "tok" / "tokenizer.json"))
    cfg = load_config(str(ROOT / "configs" / "debug.yaml"), [f"data.tokenizer={path}"])  # the shipped config
    t = cfg.model.text
    assert (t.pad_token_id, t.bos_token_id, t.eos_token_id, t.mask_token_id) == (0, 2, 3, 4)
    # a folder too
    assert load_config(None, [f"data.tokenizer={tmp_path / 'tok'}"]).model.text.bos_token_id == 2
    with pytest.raises(ConfigError, match=r"model.text.eos_token_id=102 \(tokenizer: 3\)"):
        load_config(None, [f"data.tokenizer={path}", "model.text.eos_token_id=102"])
    # a tokenizer not written yet leaves the ids as configured (the trainer checks them when it loads it)
    assert load_config(None, [f"data.tokenizer={tmp_path / 'later.json'}"]).model.text.bos_token_id == 101
