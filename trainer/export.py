"""`unimo export`: a checkpoint's weights -> one safetensors file + config + tokenizer, no DeepSpeed
needed; with ``--format hf`` also the text tower as a BERT/RoBERTa folder and the vision tower as a
ViT/CLIP-vision folder.

Consolidation uses DeepSpeed's own zero_to_fp32 reader for ZeRO shards, so the exported weights are exactly
what DeepSpeed would reconstruct; a stage-0 checkpoint (no ZeRO) holds the weights whole in one file. Loading
needs only model/ and safetensors.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer import checkpoint as ckpt

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
MODEL_PREFIX = "model."  # the objectives module wraps the model as `.model`
FORMATS = ("unimo", "hf")  # hf: also the towers as Hugging Face folders (text/, vision/)

log = logging.getLogger(__name__)


def consolidated_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of the model from a verified checkpoint (keys as in UnimoModel.state_dict())."""
    from trainer.zero_stage import saved_zero_stage

    if saved_zero_stage(Path(checkpoint_dir)) == 0:  # no ZeRO: the module's own (fp32) weights, in one file
        from trainer.checkpointing.stage0 import MODEL_STATES

        saved = torch.load(Path(checkpoint_dir) / "ds" / MODEL_STATES, map_location="cpu", weights_only=False)
        return {k[len(MODEL_PREFIX):]: v.float() if v.is_floating_point() else v
                for k, v in saved["module"].items() if k.startswith(MODEL_PREFIX)}
    from trainer.ds_extensions import import_deepspeed

    import_deepspeed()  # the package without its autotuner's MLflow import, before the submodule below
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    full = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag="ds")
    return {k[len(MODEL_PREFIX):]: v for k, v in full.items() if k.startswith(MODEL_PREFIX)}


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, source: str | None = None,
                      fmt: str = "unimo") -> Path:
    """Writes model.safetensors, config.json and tokenizer.json into ``out_dir``; returns it.

    ``source``: where the checkpoint lives when ``checkpoint_dir`` is a downloaded copy (an s3:// URL).
    ``fmt="hf"`` also writes the towers as Hugging Face folders (see write_hf_towers).
    """
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r}: must be one of {list(FORMATS)}")
    from safetensors.torch import save_file

    from data_pipeline.progress import Progress

    src = Path(checkpoint_dir)
    out = Path(out_dir)
    # stages: verify (checksums), consolidate, write weights, config + tokenizer, [the Hugging Face towers]
    with Progress(5 if fmt == "hf" else 4, f"export {src.name}", "stages") as bar:
        ckpt.verify(src)  # never export a torn checkpoint
        state = ckpt.read_state(src)
        bar.update()
        weights = consolidated_state_dict(src)
        bar.update()
        out.mkdir(parents=True, exist_ok=True)
        # Tied weights share storage; safetensors stores each name on its own, so give each its own copy.
        save_file({k: v.contiguous().clone() for k, v in weights.items()}, str(out / WEIGHTS),
                  metadata={"step": str(state["step"]), "run": state["config"]["run"]["name"]})
        bar.update()
        (out / CONFIG).write_text(json.dumps({"model": state["config"]["model"], "step": state["step"],
                                              "source_checkpoint": source or str(src.resolve())}, indent=1))
        export_tokenizer(src, state, out / "tokenizer.json", source)
        bar.update()
        if fmt == "hf":
            write_hf_towers(model_from_config(state["config"]["model"], weights), out)
            bar.update()
    return out


def write_hf_towers(model, out: Path) -> tuple[Path, Path]:
    """<out>/text: the text tower as a BERT (or RoBERTa) folder with its tokenizer; <out>/vision: the vision
    tower as a ViT (or CLIP-vision) folder with its image processor. `transformers.AutoModel`,
    `AutoTokenizer` and `AutoImageProcessor` load them; the tokenizer adds [CLS] ... [SEP] as training did."""
    from model.hf_loading import save_text_encoder, save_vision_encoder

    text, vision = out / "text", out / "vision"
    save_text_encoder(model, str(text))
    save_vision_encoder(model, str(vision))
    if (out / "tokenizer.json").is_file():
        _write_hf_tokenizer(out / "tokenizer.json", text, model.cfg.text)
    return text, vision


def _write_hf_tokenizer(src: Path, dest: Path, text_cfg) -> None:
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(str(src))
    names = {role: tok.id_to_token(getattr(text_cfg, f"{role}_token_id"))
             for role in ("pad", "bos", "eos", "mask")}
    if tok.post_processor is None:  # ours add [CLS]/[SEP] by hand; transformers users get them from the file
        cls, sep = names["bos"], names["eos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, text_cfg.bos_token_id), (sep, text_cfg.eos_token_id)])
    tok.save(str(dest / "tokenizer.json"))
    unk = next((n for n in ("[UNK]", "<unk>") if tok.token_to_id(n) is not None), None)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": text_cfg.max_seq_len,
           "pad_token": names["pad"], "cls_token": names["bos"], "sep_token": names["eos"],
           "mask_token": names["mask"], **({"unk_token": unk} if unk else {})}
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))


def export_tokenizer(checkpoint_dir: Path, state: dict, dest: Path, source: str | None = None) -> None:
    """Writes the tokenizer the checkpoint was trained with to ``dest``: the checkpoint's own copy. A
    checkpoint saved before unimo kept one gets the configured data.tokenizer as it is now, with a warning (it
    may have changed since the training)."""
    kept = Path(checkpoint_dir) / ckpt.TOKENIZER
    if kept.is_file():
        shutil.copyfile(kept, dest)
        return
    url = state["config"]["data"].get("tokenizer", "")
    if url:
        log.warning("checkpoint %s holds no %s (saved before unimo kept one): exporting data.tokenizer=%s "
                    "as it is now, which may differ from the tokenizer trained with",
                    source or checkpoint_dir, ckpt.TOKENIZER, url)
        _copy_tokenizer(url, dest)


def checkpoint_tokenizer(checkpoint_dir: Path, state: dict) -> str:
    """The tokenizer.json a checkpoint was trained with: its own copy, else (older checkpoints) the configured
    one ("" when it names none)."""
    kept = Path(checkpoint_dir) / ckpt.TOKENIZER
    return str(kept) if kept.is_file() else state["config"]["data"].get("tokenizer", "")


def _copy_tokenizer(url: str, dest: Path) -> None:
    if not url:
        return
    import fsspec

    path = url if url.endswith(".json") else url.rstrip("/") + "/tokenizer.json"
    with fsspec.open(path, "rb") as f:
        dest.write_bytes(f.read())


def model_from_config(raw_model: dict, weights: dict[str, torch.Tensor]):
    """A UnimoModel built from a saved model section (checkpoint or export) with ``weights`` loaded
    strictly."""
    from model.config import ModelConfig
    from model.unimo import UnimoModel
    from trainer.config import _model_base  # the flavor-aware model section builder
    from trainer.config_loader import build

    cfg = build(ModelConfig, raw_model, base=_model_base(raw_model, None), path="model")
    model = UnimoModel(cfg)
    model.load_state_dict(weights, strict=True)
    return model


def is_export(folder: str | Path) -> bool:
    """True for an `unimo export` folder (config.json + model.safetensors, no checkpoint manifest)."""
    f = Path(folder)
    return (f / WEIGHTS).is_file() and (f / CONFIG).is_file() and not (f / ckpt.MANIFEST).is_file()


def load_exported(out_dir: str | Path):
    """Rebuilds the UnimoModel of an export (plain PyTorch, strict load)."""
    from safetensors.torch import load_file

    raw = json.loads((Path(out_dir) / CONFIG).read_text())["model"]
    return model_from_config(raw, load_file(str(Path(out_dir) / WEIGHTS)))


@dataclass
class LoadedModel:
    """A model ready to evaluate, and where it came from."""

    model: object  # UnimoModel
    step: int
    tokenizer: str  # tokenizer.json path or URL ("" when the source names none)
    source: str  # the folder or URL it was loaded from
    kind: str  # "checkpoint" or "export"
    state: dict = field(default_factory=dict)  # trainer_state.json of a checkpoint (config, mlflow_run_id)
    config: dict = field(default_factory=dict)  # config.json of an export


def load_model(folder: str | Path, source: str | None = None) -> LoadedModel:
    """The model of a local checkpoint folder (verified, consolidated from its ZeRO shards) or export
    folder.

    ``source``: where the folder came from when it is a downloaded copy (an s3:// URL).
    """
    f = Path(folder)
    if is_export(f):
        cfg = json.loads((f / CONFIG).read_text())
        tok = f / "tokenizer.json"
        return LoadedModel(load_exported(f), int(cfg.get("step", 0)), str(tok) if tok.is_file() else "",
                           source or str(f), "export", config=cfg)
    if not f.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (give a checkpoint folder, e.g. "
                                f"runs/exp1/checkpoints/step_00000300, or an `unimo export` folder)")
    if not (f / ckpt.MANIFEST).is_file():
        raise ValueError(f"{folder} is neither a checkpoint (no {ckpt.MANIFEST}) nor an `unimo export` "
                         f"folder (no {WEIGHTS} + {CONFIG})")
    ckpt.verify(f)  # never evaluate a torn checkpoint
    state = ckpt.read_state(f)
    model = model_from_config(state["config"]["model"], consolidated_state_dict(f))
    return LoadedModel(model, int(state["step"]), checkpoint_tokenizer(f, state), source or str(f),
                       "checkpoint", state=state)
