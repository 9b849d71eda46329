"""The pre-training objectives, declared once: the name a config uses, the source it reads, the batch parts it
needs, its loss, its metric and its FLOPs key.

Every table that depends on the set of objectives derives from ``OBJECTIVES``: the config's validation and a
stage's sources (trainer/config.py), the batch parts the loader builds (data_pipeline/batch.py), the losses
computed (trainer/objectives.py), the metric names (``loss/<name>``, trainer/metrics.py) and the FLOPs counted
(model/flops.py). Adding an objective starts here; docs/MODEL.md describes each one.

Standard library only: the data pipeline, which may not import the model package, is allowed this one module
(tests/test_layering.py checks both).
"""

from __future__ import annotations

from dataclasses import dataclass

SOURCES = ("text", "image", "pair")  # unpaired text, unpaired images, image-text pairs


@dataclass(frozen=True)
class Objective:
    name: str                # the key of a stage's `objectives:` in a config
    source: str              # the data source its micro-batches come from (one of SOURCES)
    batch_parts: frozenset   # batch parts it reads beyond ids, attention masks, pixels and image ids
    head: str                # what runs on top of the encoders: the FLOPs key within the source
                             # (model/flops.py)
    loss: str                # the function of model/losses.py that scores it
    summary: str             # one line for docs and `unimo config` listings

    @property
    def metric(self) -> str:
        """The MLflow metric of its loss."""
        return f"loss/{self.name}"


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("mlm_text", "text", frozenset({"text_mlm"}), "mlm", "mlm_loss",
              "masked language modelling on unpaired text (text encoder)"),
    Objective("lm_text", "text", frozenset(), "lm", "lm_loss",
              "prefix language modelling on unpaired text (text encoder, prefix mask)"),
    Objective("mim", "image", frozenset({"patch_mask"}), "mim", "mim_loss",
              "masked patch regression on unpaired images (vision encoder)"),
    Objective("itc", "pair", frozenset({"contrast"}), "itc", "cmcl_loss",
              "cross-modal contrastive learning over the global batch, with rewritten hard negatives (CMCL)"),
    Objective("itm", "pair", frozenset(), "itm", "itm_loss",
              "image-text matching with hard negatives drawn from the contrastive similarities"),
    Objective("mlm_pair", "pair", frozenset({"pair_mlm"}), "mlm", "mlm_loss",
              "masked language modelling conditioned on the image (fusion text stream)"),
    Objective("caption", "pair", frozenset(), "lm", "lm_loss",
              "captioning language modelling (causal fusion text stream)"),
    Objective("grounding", "pair", frozenset({"phrases"}), "grounding", "grounding_contrast",
              "phrase-patch alignment against a look-alike image (fine-grained concepts)"),
)}


def names_of(source: str) -> tuple[str, ...]:
    """The objectives that read ``source``, in declaration order."""
    return tuple(o.name for o in OBJECTIVES.values() if o.source == source)


def heads_of(source: str) -> tuple[str, ...]:
    """The distinct heads run on ``source``'s micro-batches (FLOPs keys), in declaration order."""
    return tuple(dict.fromkeys(o.head for o in OBJECTIVES.values() if o.source == source))
