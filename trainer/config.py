"""The root of the typed config tree: run, model, data, stages, optimizer, deepspeed, checkpoint, tracking,
scaling.

Each component owns its dataclass (model/config.py, data_pipeline/config.py, the trainer's below); this file
composes them. ``load_config`` reads defaults <- YAML <- dotted overrides and returns a validated
``RunConfig``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal
from pathlib import Path

from data_pipeline.config import DataConfig
from model.config import ModelConfig
from model.flavors import get_flavor
from model.objective_registry import OBJECTIVES
from model.validation import check, check_choices

from trainer.config_loader import BASE_HOOKS, ConfigError, build, merge_raw
from trainer import shipped_configs


# Enumerations (the loader refuses any other value, naming the choices).
Schedule = Literal["cosine", "linear", "constant"]
ZeroStage = Literal["auto", "0", "1", "2", "3"]
Precision = Literal["auto", "fp32", "bf16", "autocast"]
PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
PreemptionNotice = Literal["none", "aws", "gcp"]


@dataclass
class RunSection:
    """Run identity and storage: the same name resumes the same run."""

    name: str = "debug"  # run name; re-running or re-submitting it resumes from its newest valid checkpoint

    # local folder or s3://bucket/prefix holding <name>/checkpoints, the run lock, ...
    storage: str = "./runs"
    seed: int = 0  # model initialisation and every random draw of the trainer (the data has data.seed)

    def __post_init__(self) -> None:
        check(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", self.name)), "name", self.name,
              "must be 1-100 chars of letters, digits, '_', '.', '-'")
        check(bool(self.storage), "storage", self.storage,
              "must not be empty (a local folder or s3://bucket/prefix)")


@dataclass
class StageConfig:
    """One stage of the plan: its step budget, objectives with weights, frozen modules and LR."""

    name: str = "crossmodal"  # unique within the plan; names the stage in logs and metrics
    steps: int = 100  # optimizer steps of this stage; the plan's stages run one after the other

    # objective name -> weight of its loss in the stage's total (model/objective_registry.py lists them)
    objectives: dict[str, float] = field(default_factory=lambda: {"itc": 1.0, "mlm_pair": 1.0})
    frozen: list[str] = field(default_factory=list)  # submodules at LR 0 (still counted in the clip's norm)
    lr: float = 0.0  # peak LR of this stage; 0 = optimizer.lr
    warmup_steps: int = -1  # -1 = optimizer.warmup_steps

    def __post_init__(self) -> None:
        where = f"stage '{self.name}': "
        check(self.steps > 0, f"{where}steps", self.steps, "must be > 0")
        check(bool(self.objectives), f"{where}objectives", self.objectives, "must not be empty")
        for obj, weight in self.objectives.items():
            if obj not in OBJECTIVES:
                from trainer.config_loader import _closest

                hint = _closest(obj, list(OBJECTIVES))
                raise ValueError(f"stage '{self.name}': unknown objective '{obj}'{hint}")
            check(weight >= 0, f"{where}objectives.{obj}", weight, "must be >= 0")
        check(self.lr >= 0, f"{where}lr", self.lr, "must be >= 0")

    def sources(self) -> set[str]:
        return {OBJECTIVES[o].source for o, w in self.objectives.items() if w > 0}


@dataclass
class OptimizerConfig:
    """AdamW with warm-up then decay, applied per stage."""

    lr: float = 1e-3  # peak learning rate (a stage's own lr overrides it)
    weight_decay: float = 0.01  # AdamW decoupled weight decay (not on biases, norms, embeddings, scales)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.98  # AdamW second-moment decay
    eps: float = 1e-6  # AdamW denominator epsilon
    grad_clip: float = 1.0  # 0 disables clipping
    warmup_steps: int = 10  # linear warm-up from 0 to the peak LR at the start of each stage
    schedule: Schedule = "cosine"  # cosine | linear | constant (after warm-up, within each stage)
    min_lr_ratio: float = 0.1  # the decay ends at this share of the peak LR

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", self.lr, "must be > 0")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        check(0 <= self.beta1 < 1, "beta1", self.beta1, "must lie in [0, 1)")
        check(0 <= self.beta2 < 1, "beta2", self.beta2, "must lie in [0, 1)")
        check(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be >= 0")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        check_choices(self)
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "must lie in [0, 1]")


@dataclass
class DeepSpeedSettings:
    """ZeRO settings; the DeepSpeed JSON is derived from these (trainer/ds_config.py)."""

    # 0..3, or auto: stage 0 (no ZeRO) for one rank in fp32 or autocast, else 1, 2 or 3 from the parameter
    # count, world size, precision, offload and device memory (trainer/zero_stage.py; the choice and its
    # reason are printed at start and logged as MLflow params)
    zero_stage: ZeroStage = "auto"
    # auto: the share of a device's memory that model states (weights, gradients, optimizer) may take; the
    # rest is left to activations, communication buffers and fragmentation
    auto_memory_fraction: float = 0.5
    # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 (bf16 weights, fp32 master copy in the optimizer) |
    # autocast (fp32 weights, matmuls and attention in bf16 under torch.autocast: DeepSpeed's torch_autocast)
    precision: Precision = "auto"
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer states and step on the CPU (GPU runs only)
    offload_params: bool = False  # ZeRO-Infinity: ZeRO-3 parameters held in CPU memory between uses

    # ZeRO-3 sizes in elements; 0 = derived from the hidden size (trainer/ds_config.py: zero3_sizes)
    prefetch_bucket_size: int = 0
    param_persistence_threshold: int = 0  # parameters this small stay gathered on every rank (0 = derived)
    max_live_parameters: int = 1_000_000_000  # gathered parameter elements alive at once before releases

    # ZeRO-3 gathers and releases the parameters of each block, embedding, fusion projection and head at once
    # (the model's whole units, DeepSpeed's leaf modules) instead of around every Linear and LayerNorm inside
    # them: ~6x fewer hook calls per step (trainer/zero3_units.py, docs/PERFORMANCE.md)
    zero3_whole_units: bool = True
    # ZeRO (stages 1-3) takes the gradient norm in one pass with one all-reduce, instead of DeepSpeed's per
    # parameter and per group (23 all-reduces a step here): trainer/grad_norm.py
    one_pass_grad_norm: bool = True

    # How far ahead (in parameter elements) ZeRO-3 looks for reuse before releasing a gathered parameter.
    # DeepSpeed's default (1e9) makes each release scan the rest of the trace: measured 50% of the step of the
    # small flavor on CPU (bench/bench_trainer.py); a shorter window keeps the benefit for adjacent reuse.
    max_reuse_distance: int = 1_000_000
    # DeepSpeed's memory-efficient Linear re-gathers each weight in backward instead of keeping it gathered
    # from the forward. None = on only with several ranks: with one nothing is partitioned, so it saves
    # nothing, and DeepSpeed installs it by replacing torch.nn.functional.linear for the whole process.
    memory_efficient_linear: bool | None = None
    reduce_bucket_size: int = 0  # 0 = four transformer blocks' gradients (zero3_sizes)
    overlap_comm: bool = False  # overlap gradient reduction with the backward pass (more buffer memory)

    # Gradient reduction: reduce-scatter (each rank receives its partition) or all-reduce of the contiguous
    # bucket (each rank keeps its slice). None = reduce-scatter with several ranks, all-reduce with one, where
    # the scatter's interleaving copy of every gradient buys nothing (bench/bench_trainer.py).
    reduce_scatter: bool | None = None

    def __post_init__(self) -> None:
        self.zero_stage = str(self.zero_stage)  # YAML's 3 and a test's DeepSpeedSettings(zero_stage=3) alike
        check_choices(self)
        check(0 < self.auto_memory_fraction <= 1, "auto_memory_fraction", self.auto_memory_fraction,
              "must lie in (0, 1]")


@dataclass
class TrainSection:
    """Batch geometry and loop cadence."""

    # micro-batches per optimizer step summed over ranks; accum = this / world size
    global_micro_batches: int = 2
    seq_len: int = 0  # tokens per text sample (with [CLS]/[SEP]); 0 = the model's position table size
    log_every: int = 1  # steps between a progress line and a metrics row in MLflow
    eval_every: int = 0  # 0 = only at the end
    eval_samples: int = 100  # held-out pairs used for retrieval (the candidate pool size)
    eval_rerank_k: int = 0  # > 0: also re-rank each query's ITC top-k by the ITM head (eval/itm_* metrics)

    # torch.compile every encoder block and fusion stream layer (model/layers.py: compile_blocks): fewer
    # kernel launches and fused element-wise ops on GPU; the first steps pay the compilation (seconds per
    # block shape)
    compile: bool = False
    watchdog_seconds: float = 600.0  # a step making no progress this long ends the worker with a message

    # The same for start-up (engine build, checkpoint restore), evaluation and a checkpoint save: slower than
    # a step, but a collective hung inside one must still end the worker (trainer/watchdog.py)
    watchdog_phase_seconds: float = 1800.0

    def __post_init__(self) -> None:
        check(self.global_micro_batches > 0, "global_micro_batches", self.global_micro_batches, "must be > 0")
        check(self.seq_len >= 0, "seq_len", self.seq_len, "must be >= 0")
        check(self.log_every > 0, "log_every", self.log_every, "must be > 0")
        check(self.eval_every >= 0, "eval_every", self.eval_every, "must be >= 0")
        check(self.eval_rerank_k >= 0, "eval_rerank_k", self.eval_rerank_k, "must be >= 0")
        check(self.watchdog_seconds > 0, "watchdog_seconds", self.watchdog_seconds, "must be > 0")
        check(self.watchdog_phase_seconds > 0, "watchdog_phase_seconds", self.watchdog_phase_seconds,
              "must be > 0")


@dataclass
class CheckpointConfig:
    """When to save and what to keep."""

    every_steps: int = 50  # 0 = only at the end (and on a stop request)
    every_minutes: float = 0.0  # also save when this much time passed since the last save; 0 = off
    keep_last: int = 2  # the newest checkpoints kept; older ones are deleted once a newer one is complete
    keep_every: int = 0  # additionally keep every M-th step's checkpoint; 0 = none
    async_upload: bool = True  # upload to storage in the background; the loop only waits for the local save

    # Tries per S3 request of a checkpoint upload, with the AWS SDK's backoff: 10 bridge an outage of about a
    # minute and a half (pyarrow's default of 3 gave up after 0.6 s here); then the upload fails, naming the
    # key.
    upload_attempts: int = 10

    # the cloud's advance notice of a spot/preemptible reclaim, polled on every worker from the instance
    # metadata service: a notice saves a checkpoint at the next step and ends the run preempted, before the
    # SIGTERM (aws: 2 min ahead, gcp: 30 s); none = off
    preemption_notice: PreemptionNotice = "none"
    notice_poll_seconds: float = 5.0  # how often each worker asks the metadata service

    def __post_init__(self) -> None:
        check(self.every_steps >= 0, "every_steps", self.every_steps, "must be >= 0")
        check(self.notice_poll_seconds > 0, "notice_poll_seconds", self.notice_poll_seconds, "must be > 0")
        check_choices(self)
        check(self.upload_attempts >= 1, "upload_attempts", self.upload_attempts, "must be >= 1")
        check(self.every_minutes >= 0, "every_minutes", self.every_minutes, "must be >= 0")
        check(self.keep_last >= 1, "keep_last", self.keep_last, "must be >= 1")
        check(self.keep_every >= 0, "keep_every", self.keep_every, "must be >= 0")


@dataclass
class TrackingConfig:
    """MLflow tracking: one run per job; rank 0 logs, batched and off the step path."""

    uri: str = ""  # "" = sqlite:///<storage>/mlflow.db (the embedded default); or http://host:5000
    experiment: str = "unimo"  # MLflow experiment the run goes to (created if missing)
    flush_seconds: float = 2.0  # how often the background logger sends a batch

    # MLflow unreachable at start: False = stop with an error naming the URI; True = train on, buffering
    # metrics (memory, then <storage>/<run>/mlflow_spool), and create the run once the server answers
    # (docs/TRACKING.md)
    buffer_if_unreachable: bool = False
    system_metrics_seconds: float = 10.0  # CPU/memory/disk/network/GPU sampling period per node; 0 = off

    # at a successful end, export the last checkpoint (`unimo export`) into artifacts model/ and register it
    # as an MLflow logged model of the run
    log_model: bool = False

    def __post_init__(self) -> None:
        check(self.flush_seconds > 0, "flush_seconds", self.flush_seconds, "must be > 0")
        check(self.system_metrics_seconds >= 0, "system_metrics_seconds", self.system_metrics_seconds,
              "must be >= 0 (0 = off)")


@dataclass
class ScalingConfig:
    """How many Ray Train workers and what each gets; read by the orchestrator."""

    address: str = ""  # Ray cluster address; "" = start an embedded local Ray on 127.0.0.1
    num_workers: int = 2  # the worker count to run with (the maximum when min_workers is set)

    # > 0 and < num_workers: elastic, the job goes on with min..num_workers (Ray Train V2)
    min_workers: int = 0
    use_gpu: bool = False  # one GPU per worker (NCCL, bf16); False trains on CPU over gloo
    cpus_per_worker: int = 1  # CPUs Ray reserves for each worker; also its intra-op threads on CPU
    placement_strategy: PlacementStrategy = "PACK"  # Ray placement of the workers: PACK fills nodes first

    # the embedded Ray's dashboard on 127.0.0.1:8265 (off: MLflow is where a run is watched); a cluster's
    # dashboard is the cluster's own
    dashboard: bool = False
    # the nice value of the embedded Ray's worker processes (training workers, Ray Train's controller, the
    # loader's workers). Ray's own default, 15, keeps its control plane responsive on a node that only runs
    # Ray, but on a shared machine any process at normal priority starves the training (a worker got ~6 % of a
    # core against two busy loops); 0 = the priority `unimo train` itself runs at. A cluster's nodes take
    # theirs at `ray start` (RAY_worker_niceness; docs/CLUSTER.md)
    worker_niceness: int = 0

    # worker-group restarts in a row without a new checkpoint before the job fails (a failure after a newer
    # checkpoint was saved starts the count again); -1 = unlimited
    max_failures: int = 3
    # all worker-group failures one job may recover from, progress or not; 0 = no cap
    max_total_failures: int = 0

    def __post_init__(self) -> None:
        check(self.num_workers >= 1, "num_workers", self.num_workers, "must be >= 1")
        check(0 <= self.min_workers <= self.num_workers, "min_workers", self.min_workers,
              f"must lie in [0, num_workers={self.num_workers}] (0 = fixed size)")
        check(self.cpus_per_worker >= 1, "cpus_per_worker", self.cpus_per_worker, "must be >= 1")
        # below the driver's own value would need CAP_SYS_NICE, which Ray's raylet does not ask for
        check(0 <= self.worker_niceness <= 19, "worker_niceness", self.worker_niceness,
              "must lie in [0, 19] (0 = normal priority; Ray's default is 15)")
        check_choices(self)
        check(self.max_failures >= -1, "max_failures", self.max_failures, "must be >= -1 (-1 = unlimited)")
        check(self.max_total_failures >= 0, "max_total_failures", self.max_total_failures,
              "must be >= 0 (0 = no cap)")


def _default_stages() -> list[StageConfig]:
    return [
        # The default plan (docs/MODEL.md): text MLM/LM, image MIM and coarse ITC first, then every objective
        StageConfig(name="unimodal", steps=50,
                    objectives={"mlm_text": 1.0, "lm_text": 1.0, "mim": 1.0, "itc": 1.0}),
        StageConfig(name="crossmodal", steps=50, objectives={name: 1.0 for name in OBJECTIVES}),
    ]


@dataclass
class RunConfig:
    """The whole resolved configuration of a run; saved with the run and every checkpoint."""

    run: RunSection = field(default_factory=RunSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[StageConfig] = field(default_factory=_default_stages)  # the plan: stages run in order
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)

    def __post_init__(self) -> None:
        check(bool(self.stages), "stages", self.stages, "the plan needs at least one stage")
        names = [s.name for s in self.stages]
        check(len(set(names)) == len(names), "stages", names, "stage names must be unique")
        check(self.train.global_micro_batches % self.scaling.num_workers == 0, "train.global_micro_batches",
              self.train.global_micro_batches, f"must be divisible by scaling.num_workers "
              f"({self.scaling.num_workers}): the global batch is fixed by the config")
        # An elastic job may run with any worker count in min..max; each must split the fixed global batch.
        sizes = range(self.scaling.min_workers or self.scaling.num_workers, self.scaling.num_workers + 1)
        odd = [w for w in sizes if self.train.global_micro_batches % w]
        check(not odd, "train.global_micro_batches", self.train.global_micro_batches,
              f"must be divisible by every worker count of scaling.min_workers..num_workers; not by {odd}")

    def check_ready_to_train(self) -> None:
        """Checks what only matters once training starts (called before any worker starts)."""
        for stage in self.stages:
            for src in sorted(stage.sources()):
                if not self.data.corpora(src):
                    raise ConfigError(f"stage '{stage.name}' uses objectives on '{src}' data but "
                                      f"data.{src}.urls is empty: set data.{src}.urls=... or drop those "
                                      f"objectives from the stage")

    @property
    def seq_len(self) -> int:
        text = self.model.text
        usable = text.max_positions - (text.pad_token_id + 1 if text.position_style == "roberta" else 0)
        return min(self.train.seq_len or usable, usable)

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)


def _model_base(raw: dict, base: ModelConfig | None) -> ModelConfig:
    """A model section starts from its flavor's config, so YAML only states what differs; towers initialised
    from Hugging Face folders (text_init, vision_init) take their shapes from those folders."""
    flavor = raw.get("flavor") if isinstance(raw, dict) else None
    if flavor is None:
        out = base if base is not None else get_flavor("debug")
    else:
        try:
            out = get_flavor(str(flavor))
        except (KeyError, ValueError) as err:
            raise ConfigError(f"model.flavor: {err}") from None
    return _shaped_by_init(raw, out)


def _shaped_by_init(raw: dict, base: ModelConfig) -> ModelConfig:
    from dataclasses import replace

    if not isinstance(raw, dict) or not (raw.get("text_init") or raw.get("vision_init")):
        return base
    from model import hf_loading  # torch: only for a run that starts from a folder

    text, vision = base.text, base.vision
    try:
        if raw.get("text_init"):
            text = hf_loading.shaped_text_config(str(raw["text_init"]), raw.get("text") or {})
        if raw.get("vision_init"):
            vision = hf_loading.shaped_vision_config(str(raw["vision_init"]), raw.get("vision") or {})
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(str(err)) from None
    return replace(base, text=text, vision=vision)


# model.text special ids <- the tokenizer's roles: [PAD]/<pad>, [CLS]/<s>, [SEP]/</s>, [MASK]/<mask>
_SPECIAL_ROLES = {"pad_token_id": "pad_id", "bos_token_id": "cls_id", "eos_token_id": "sep_id",
                  "mask_token_id": "mask_id"}


def _tokenizer_if_readable(url: str):
    """The tokenizer of a local file or folder, or None (remote, not written yet, unreadable). A remote one is
    not read here: loading a config must not wait on storage; the trainer checks the ids when it loads it."""
    from data_pipeline.tokenizer import TextTokenizer

    path = Path(url).expanduser()
    if "://" in url:
        return None
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        return TextTokenizer.from_str(path.read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - missing or not a tokenizer: the trainer reads it again and says why
        return None


def tokenizer_mismatch(cfg: RunConfig, tok) -> str | None:
    """Why the tokenizer ``tok`` does not fit model.text (vocabulary or special ids), or None: one rule for
    the pre-flight (orchestrator/preflight.py) and the trainer (trainer/loop.py)."""
    text = cfg.model.text
    if tok.vocab_size > text.vocab_size:
        return (f"data.tokenizer={cfg.data.tokenizer} has {tok.vocab_size} tokens but "
                f"model.text.vocab_size={text.vocab_size}; raise model.text.vocab_size")
    wrong = [f"model.text.{k}={getattr(text, k)} (tokenizer: {getattr(tok, role)})"
             for k, role in _SPECIAL_ROLES.items() if getattr(text, k) != getattr(tok, role)]
    if wrong:
        return (f"model special-token ids do not match the tokenizer {cfg.data.tokenizer}: "
                f"{', '.join(wrong)}; set them in the config")
    return None


def adopt_remote_tokenizer_ids(cfg: RunConfig) -> RunConfig:
    """The special-token ids of a tokenizer on remote storage (s3://, http...), which loading the config does
    not read: the driver calls this before its pre-flight, so the workers get the ids the tokenizer
    holds."""
    if not cfg.data.tokenizer or "://" not in cfg.data.tokenizer:
        return cfg
    from data_pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.data.tokenizer)
    for k, role in _SPECIAL_ROLES.items():
        setattr(cfg.model.text, k, getattr(tok, role))
    return cfg


def _adopt_tokenizer(cfg: RunConfig, raw: dict) -> RunConfig:
    """The text tower's special-token ids come from the run's tokenizer file (the text_init folder's when
    data.tokenizer is empty); ids the config states must agree with it. A tokenizer that cannot be read yet
    leaves the ids as configured (remote files are not read here): the trainer checks them when it loads
    it."""
    model_raw = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    folder_tok = ""
    if cfg.model.text_init:
        from model.hf_loading import folder_tokenizer  # torch: only for a run that starts from a folder

        folder_tok = folder_tokenizer(cfg.model.text_init)
    if folder_tok and not cfg.data.tokenizer:
        cfg.data.tokenizer = folder_tok
    elif folder_tok and Path(cfg.data.tokenizer).is_file() and \
            Path(cfg.data.tokenizer).read_bytes() != Path(folder_tok).read_bytes():
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer} differs from model.text_init's tokenizer "
                          f"{folder_tok}: the pretrained text tower needs its own; drop data.tokenizer")
    if not cfg.data.tokenizer:
        return cfg
    tok = _tokenizer_if_readable(cfg.data.tokenizer)
    if tok is None:
        return cfg
    explicit = model_raw.get("text") if isinstance(model_raw.get("text"), dict) else {}
    wrong = [f"model.text.{k}={explicit[k]} (tokenizer: {getattr(tok, role)})"
             for k, role in _SPECIAL_ROLES.items() if k in explicit and explicit[k] != getattr(tok, role)]
    if wrong:
        raise ConfigError(f"{', '.join(wrong)} disagree with the tokenizer {cfg.data.tokenizer}: "
                          f"special-token ids come from the tokenizer file; drop these settings")
    for k, role in _SPECIAL_ROLES.items():
        setattr(cfg.model.text, k, getattr(tok, role))
    try:
        cfg.model.text.__post_init__()  # the ids must fit the vocabulary
    except ValueError as err:
        raise ConfigError(f"model.text with the ids of tokenizer {cfg.data.tokenizer}: {err}") from None
    return cfg


BASE_HOOKS[ModelConfig] = _model_base


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- YAML file <- dotted overrides; raises ConfigError naming the key on any problem."""
    text = None
    if path is not None:
        p = shipped_configs.resolve(path)
        if p is None:
            names = ", ".join(shipped_configs.shipped_names()) or "none found"
            raise ConfigError(f"config file '{path}' not found: give a YAML file's path or a shipped "
                              f"config's name ({names}; `unimo config list`)")
        text = p.read_text()
    try:
        raw = merge_raw(text, list(overrides or []))
    except Exception as err:  # yaml errors carry line numbers; keep them
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"config file '{path}': {err}") from None
    return _adopt_tokenizer(build(RunConfig, raw), raw)


def config_from_dict(raw: dict) -> RunConfig:
    """Rebuilds a RunConfig from its ``to_dict`` form (what workers and checkpoints carry)."""
    return build(RunConfig, raw)
