"""`unimo eval SOURCE --data SHARDS`: retrieval, zero-shot classification and sample captions of a checkpoint
or an export, as a table (or JSON), optionally logged to MLflow.

SOURCE is a checkpoint folder (local or s3://, verified before use) or an `unimo export` folder. The metrics
are trainer.evaluation's, on a held-out set read by data_pipeline.loader.build_eval_pairs: what training logs
as eval/* is what this prints, for the same data.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CAPTIONS = 4
METRIC_PREFIX = "offline_eval"  # MLflow metric/artifact folder: apart from the training loop's own eval/*
DEFAULT_TEMPLATE = "a picture of {}"

USAGE = """examples:
  unimo eval runs/exp1/checkpoints/step_00000300 --data data/eval
  unimo eval s3://bucket/runs/exp1/checkpoints/step_00000300 --data s3://bucket/eval --rerank 16 --mlflow
  unimo eval exported/ --data data/eval --classes classes.txt --label-field tags --json
"""


def add_parser(sub) -> None:
    """Adds `eval` to the `unimo` subcommands (cheap: torch is imported when the command runs)."""
    p = sub.add_parser("eval", help="retrieval R@1/5/10, zero-shot accuracy and captions of a "
                                    "checkpoint/export",
                       description="Evaluates a checkpoint folder (local or s3://) or an `unimo export` "
                                   "folder on held-out image-text shards: image<->text retrieval R@1/5/10 by "
                                   "ITC (and re-ranked by ITM with --rerank K), zero-shot classification "
                                   "top-1/top-5 with --classes, and sample captions.",
                       epilog=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source",
                   help="checkpoint folder or s3:// URL (…/checkpoints/step_00000300) or export folder")
    p.add_argument("--data", required=True,
                   help="held-out image-text WebDataset shards: folder, brace pattern or s3:// URL")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json (default: the export's, or the one the checkpoint's "
                        "run trained with)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per caption (default: the run's train.seq_len, else the model's positions)")
    p.add_argument("--rerank", type=int, default=0, metavar="K",
                   help="also re-rank each query's ITC top K with the ITM head (0 = off)")
    p.add_argument("--classes", default=None, metavar="FILE",
                   help="class names for zero-shot classification: a text file (one class a line, or "
                        "'name: prompt | prompt') or JSON ({name: [prompts]} or [names])")
    p.add_argument("--template", action="append", default=None,
                   help=f"prompt template for classes without prompts, '{{}}' = the class name; repeatable "
                        f"(default: '{DEFAULT_TEMPLATE}')")
    p.add_argument("--label-field", default=None, metavar="FIELD",
                   help="json field of each sample holding its class (a string or a list); default: the "
                        "classes named in the image's captions")
    p.add_argument("--captions", type=int, default=CAPTIONS, help="images to caption (0 = none)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--mlflow", action="store_true",
                   help="log the figures to the MLflow run that made the checkpoint, at its step (a new run "
                        "for an export), with the table, JSON and captions as artifacts")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the run's own)")
    p.add_argument("--experiment", default="unimo", help="experiment of a new run (exports only)")


# ------------------------------------------------------------------------------------------- loading

@contextlib.contextmanager
def _loaded(source: str):
    """The LoadedModel of ``source``; an s3:// checkpoint is verified in a temporary local copy."""
    from trainer import storage
    from trainer.checkpoint import checked_local_copy
    from trainer.export import load_model

    # DeepSpeed's checkpoint reader prints progress on stdout, which belongs to the table (or the JSON).
    with contextlib.redirect_stdout(sys.stderr):
        if not storage.is_remote(source):
            yield load_model(source)
            return
        with tempfile.TemporaryDirectory(prefix="unimo-eval-") as tmp:
            yield load_model(checked_local_copy(source, Path(tmp)), source=source)


def _tokenizer_path(args: argparse.Namespace, loaded) -> str:
    path = args.tokenizer or loaded.tokenizer
    if not path:
        raise ValueError(f"{args.source} names no tokenizer: give one with --tokenizer PATH")
    if "://" not in path and not Path(path).exists():
        raise FileNotFoundError(f"tokenizer {path} (from {args.source}) not found here: give the run's "
                                f"tokenizer.json with --tokenizer PATH")
    return path


def _seq_len(args: argparse.Namespace, loaded) -> int:
    """--seq-len, else the run's train.seq_len, capped by what the text position table holds."""
    text = loaded.model.cfg.text
    usable = text.max_positions - (text.pad_token_id + 1 if text.position_style == "roberta" else 0)
    wanted = args.seq_len or loaded.state.get("config", {}).get("train", {}).get("seq_len", 0)
    return min(wanted or usable, usable)


# -------------------------------------------------------------------------------------- zero-shot labels

def read_classes(path: str, templates: list[str] | None) -> dict[str, list[str]]:
    """{class name: prompts} from a class file (see the --classes help)."""
    templates = templates or [DEFAULT_TEMPLATE]
    p = Path(path)
    if not p.exists() or p.is_dir():
        raise FileNotFoundError(f"--classes {path}: no such file")
    text = p.read_text()
    out: dict[str, list[str]] = {}
    if p.suffix == ".json":
        raw = json.loads(text)
        items = raw.items() if isinstance(raw, dict) else ((name, []) for name in raw)
        for name, prompts in items:
            out[str(name)] = [str(x) for x in (prompts if isinstance(prompts, list) else [prompts])]
    else:
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, _, prompts = line.partition(":")
            out[name.strip()] = [x.strip() for x in prompts.split("|") if x.strip()]
    if not out:
        raise ValueError(f"--classes {path}: no class in the file")
    return {name: prompts or [t.format(name) for t in templates] for name, prompts in out.items()}


def sample_field(url: str, name: str) -> dict[str, object]:
    """{sample key (as build_eval_pairs spells it): value of json field ``name``} over the shards of
    ``url``."""
    from data_pipeline.storage_io import RetryingReader, RetryPolicy, list_shards
    from data_pipeline.samples import shard_name
    from data_pipeline.webdataset_tar import iter_samples

    out = {}
    for shard_url, _ in list_shards(url):
        with RetryingReader(shard_url, RetryPolicy()) as reader:
            for _, key, files in iter_samples(reader, lambda reason, key: None):
                if "json" in files:
                    try:
                        meta = json.loads(files["json"].decode("utf-8"))
                    except (ValueError, UnicodeDecodeError):
                        continue
                    if isinstance(meta, dict) and name in meta:
                        out[f"{shard_name(shard_url)}/{key}"] = meta[name]
    return out


def _word(name: str) -> re.Pattern:
    return re.compile(r"\b" + re.escape(name.lower()) + r"(s|es)?\b")


def label_matrix(eval_set: dict, names: list[str], field_values: dict | None):
    """(N, C) bool: the true classes of each image, from its json field values or else its captions."""
    import torch

    labels = torch.zeros(len(eval_set["keys"]), len(names), dtype=torch.bool)
    index = {n.lower(): i for i, n in enumerate(names)}
    if field_values is not None:
        for row, key in enumerate(eval_set["keys"]):
            value = field_values.get(key)
            for v in (value if isinstance(value, list) else [value]):
                if isinstance(v, str | int) and str(v).lower() in index:
                    labels[row, index[str(v).lower()]] = True
        return labels
    patterns = [_word(n) for n in names]
    for caption, row in zip(eval_set["captions"], eval_set["text_image_index"].tolist()):
        for c, pattern in enumerate(patterns):
            if pattern.search(caption.lower()):
                labels[row, c] = True
    return labels


# ------------------------------------------------------------------------------------------- running

@dataclass
class EvalResult:
    source: str
    kind: str
    step: int
    data: str
    metrics: dict[str, float]
    captions: list[dict] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"source": self.source, "kind": self.kind, "step": self.step, "data": self.data,
                "metrics": self.metrics, "captions": self.captions}


def run_eval(args: argparse.Namespace, loaded) -> EvalResult:
    import torch

    from data_pipeline.loader import build_eval_pairs
    from data_pipeline.tokenizer import load_tokenizer
    from trainer import evaluation as ev
    from data_pipeline.progress import Progress

    model = loaded.model.eval()
    tokenizer = load_tokenizer(_tokenizer_path(args, loaded))
    seq_len = _seq_len(args, loaded)
    eval_set = build_eval_pairs(args.data, seq_len=seq_len, image_size=model.cfg.vision.image_size,
                                tokenizer=tokenizer, limit=args.limit)
    tensors = {k: v for k, v in eval_set.items() if isinstance(v, torch.Tensor)}
    with Progress(ev.retrieval_work(tensors, args.rerank), "eval retrieval", "items") as bar:
        feats = ev.encode_eval_set(model, tensors, args.batch_size, progress=bar.update)
        metrics = ev.retrieval_metrics(model, tensors, args.rerank, progress=bar.update, features=feats)
    metrics["eval/texts"] = float(tensors["input_ids"].shape[0])
    if args.classes:
        metrics.update(_zero_shot(args, model, tokenizer, seq_len, eval_set, feats[1]))
    captions = []
    n = min(args.captions, tensors["pixels"].shape[0])
    if n > 0:
        with Progress(None, "eval captions", "images") as bar:
            texts = ev.sample_captions(model, tensors["pixels"][:n], decode=tokenizer.decode)
            bar.update(n)
        first = {}
        for caption, row in zip(eval_set["captions"], eval_set["text_image_index"].tolist()):
            first.setdefault(row, caption)
        captions = [{"key": eval_set["keys"][i], "caption": texts[i], "reference": first.get(i, "")}
                    for i in range(n)]
    return EvalResult(loaded.source, loaded.kind, loaded.step, args.data, metrics, captions)


def _zero_shot(args, model, tokenizer, seq_len: int, eval_set: dict, image_feats) -> dict:
    import torch

    from trainer import evaluation as ev

    classes = read_classes(args.classes, args.template)
    names = list(classes)
    prompts = [(c, p) for c, name in enumerate(names) for p in classes[name]]
    enc = [tokenizer.encode(p, seq_len) for _, p in prompts]
    ids = torch.full((len(enc), seq_len), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(enc):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    prompt_feats = ev.encode_texts(model, ids, mask, args.batch_size)
    values = sample_field(args.data, args.label_field) if args.label_field else None
    labels = label_matrix(eval_set, names, values)
    return ev.zero_shot_metrics(image_feats, prompt_feats, torch.tensor([c for c, _ in prompts]), labels)


# ------------------------------------------------------------------------------------------- output

_RETRIEVAL_ROWS = (("image->text  ITC", "eval/i2t_R@{}"), ("text->image  ITC", "eval/t2i_R@{}"),
                   ("image->text  ITM", "eval/itm_i2t_R@{}"), ("text->image  ITM", "eval/itm_t2i_R@{}"))


def format_table(result: EvalResult, rerank: int = 0) -> str:
    m = result.metrics
    n_img, n_txt = int(m["eval/candidates"]), int(m.get("eval/texts", 0))
    lines = [f"unimo eval: {result.kind} {result.source} (step {result.step})",
             f"data: {result.data} ({n_img} images, {n_txt} captions)", "",
             f"{'retrieval':<22}{'R@1':>8}{'R@5':>8}{'R@10':>8}"]
    for label, key in _RETRIEVAL_ROWS:
        if key.format(1) in m:
            suffix = f" top{rerank}" if "ITM" in label and rerank else ""
            lines.append(f"{label + suffix:<22}" + "".join(f"{m[key.format(k)]:>8.3f}" for k in (1, 5, 10)))
    lines.append(f"(chance R@1 = 1/{n_img} images = {1 / max(n_img, 1):.3f})")
    if "eval/zeroshot_classes" in m:
        lines += ["", f"zero-shot classification: {int(m['eval/zeroshot_classes'])} classes, "
                      f"{int(m['eval/zeroshot_images'])} labelled images "
                      f"({int(m['eval/zeroshot_unlabelled'])} without a class left out)"]
        if "eval/zeroshot_top1" in m:
            lines.append(f"  top-1 {m['eval/zeroshot_top1']:.3f}   top-5 {m['eval/zeroshot_top5']:.3f}")
    if result.captions:
        lines += ["", "sample captions:"]
        lines += [f"  {c['key']}: {c['caption']!r}  (reference: {c['reference']!r})" for c in result.captions]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- MLflow

def _tracking_uri(args: argparse.Namespace, loaded) -> str:
    """--tracking-uri, MLFLOW_TRACKING_URI, the run's recorded URI, its config's, else the embedded
    default."""
    import os

    from trainer import storage
    from trainer.run_identity import RUN_ID_FILE

    if args.tracking_uri:
        return args.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if loaded.kind == "checkpoint":
        src = loaded.source if storage.is_remote(loaded.source) else str(Path(loaded.source).resolve())
        run_dir = storage.parent_of(storage.parent_of(src))  # <run>/checkpoints/step_N
        recorded = storage.read_text(storage.join(run_dir, RUN_ID_FILE))
        uri = json.loads(recorded).get("tracking_uri", "") if recorded else ""
        uri = uri or loaded.state.get("config", {}).get("tracking", {}).get("uri", "")
        if uri and "***" not in uri:  # a redacted URI (credentials were in it) cannot be used
            return uri
        if not storage.is_remote(run_dir):
            return f"sqlite:///{(Path(run_dir).parent / 'mlflow.db').resolve()}"
    raise ValueError("no MLflow tracking URI for --mlflow: give --tracking-uri URI or set "
                     "MLFLOW_TRACKING_URI")


def log_to_mlflow(args: argparse.Namespace, loaded, result: EvalResult, table: str) -> tuple[str, str]:
    """Logs the metrics at the checkpoint's step and the table, JSON and captions as artifacts; (uri, run
    id)."""
    from mlflow.entities import Metric

    from orchestrator.tracking_setup import open_client
    from trainer.metric_logger import metric_key
    from trainer.run_identity import training_experiment

    uri = _tracking_uri(args, loaded)
    client = open_client(uri)
    run_id = loaded.state.get("mlflow_run_id") if loaded.kind == "checkpoint" else None
    created = run_id is None
    if created:
        exp_id = training_experiment(client, args.experiment)
        run_id = client.create_run(exp_id, run_name=f"eval-{Path(str(loaded.source).rstrip('/')).name}",
                                   tags={"unimo.eval_of": str(loaded.source), "unimo.kind": loaded.kind,
                                         "unimo.step": str(loaded.step)}).info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric(metric_key(f"{METRIC_PREFIX}/{k.split('/', 1)[1]}"), float(v), now, result.step)
               for k, v in result.metrics.items()]
    for i in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[i:i + 500])
    folder = f"{METRIC_PREFIX}/step_{result.step:08d}"
    client.log_text(run_id, table + "\n", f"{folder}/table.txt")
    client.log_text(run_id, json.dumps(result.as_json(), indent=1), f"{folder}/results.json")
    if result.captions:
        client.log_text(run_id, "".join(f"{c['key']}\t{c['caption']}\t{c['reference']}\n"
                                        for c in result.captions), f"{folder}/captions.tsv")
    if created:
        client.set_terminated(run_id)
    return uri, run_id


def main(args: argparse.Namespace) -> int:
    import torch

    # a scope, not torch.set_grad_enabled(False): main() also runs inside other processes (tests, notebooks)
    with torch.no_grad(), _loaded(args.source) as loaded:
        result = run_eval(args, loaded)
        table = format_table(result, args.rerank)
        if args.mlflow:
            uri, run_id = log_to_mlflow(args, loaded, result, table)
            from orchestrator.tracking_setup import shown_uri

            print(f"logged to MLflow run {run_id} at step {result.step} ({shown_uri(uri)})", file=sys.stderr)
    print(json.dumps(result.as_json(), indent=1) if args.json else table)
    return 0
