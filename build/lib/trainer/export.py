"""`unimo export`: a checkpoint's ZeRO-3 shards -> one safetensors file + config + tokenizer, no DeepSpeed needed.

Consolidation uses DeepSpeed's own zero_to_fp32 reader, so the exported weights are exactly what DeepSpeed
would reconstruct; loading needs only model/ and safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer import checkpoint as ckpt

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
MODEL_PREFIX = "model."  # the objectives module wraps the model as `.model`


def consolidated_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of the model from a verified checkpoint (keys as in UnimoModel.state_dict())."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    full = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag="ds")
    return {k[len(MODEL_PREFIX):]: v for k, v in full.items() if k.startswith(MODEL_PREFIX)}


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, source: str | None = None) -> Path:
    """Writes model.safetensors, config.json and tokenizer.json into ``out_dir``; returns it.

    ``source``: where the checkpoint lives when ``checkpoint_dir`` is a downloaded copy (an s3:// URL).
    """
    from safetensors.torch import save_file

    src = Path(checkpoint_dir)
    ckpt.verify(src)  # never export a torn checkpoint
    state = ckpt.read_state(src)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = consolidated_state_dict(src)
    # Tied weights share storage; safetensors stores each name on its own, so give each its own copy.
    save_file({k: v.contiguous().clone() for k, v in weights.items()}, str(out / WEIGHTS),
              metadata={"step": str(state["step"]), "run": state["config"]["run"]["name"]})
    (out / CONFIG).write_text(json.dumps({"model": state["config"]["model"], "step": state["step"],
                                          "source_checkpoint": source or str(src.resolve())}, indent=1))
    _copy_tokenizer(state["config"]["data"]["tokenizer"], out / "tokenizer.json")
    return out


def _copy_tokenizer(url: str, dest: Path) -> None:
    if not url:
        return
    import fsspec

    path = url if url.endswith(".json") else url.rstrip("/") + "/tokenizer.json"
    with fsspec.open(path, "rb") as f:
        dest.write_bytes(f.read())


def load_exported(out_dir: str | Path):
    """Rebuilds the UnimoModel of an export (plain PyTorch, strict load)."""
    from safetensors.torch import load_file

    from model.config import ModelConfig
    from model.unimo import UnimoModel
    from trainer.config import _model_base  # the flavor-aware model section builder
    from trainer.config_loader import build

    raw = json.loads((Path(out_dir) / CONFIG).read_text())["model"]
    cfg = build(ModelConfig, raw, base=_model_base(raw, None), path="model")
    model = UnimoModel(cfg)
    model.load_state_dict(load_file(str(Path(out_dir) / WEIGHTS)), strict=True)
    return model
