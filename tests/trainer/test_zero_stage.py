"""deepspeed.zero_stage: the `auto` rule (trainer/zero_stage.py), its DeepSpeed config, and a checkpoint saved
under one stage resuming under another (3 -> 1, 3 -> 0, 0 -> 1 on two ranks, 1 on two ranks -> 3; stage 0 is
DeepSpeed without ZeRO) through the trainer's restore, over gloo on CPU."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.integration.services import free_port
from trainer.config import load_config
from trainer.ds_config import build_ds_config, zero3_sizes
from trainer.zero_stage import choose_stage, parameter_count, resolve_zero_stage, state_bytes_per_rank

GiB = 2**30


# ---------------------------------------------------------------------------------------------- the rule

def test_auto_is_the_default_and_explicit_stages_are_honoured():
    assert load_config(None, []).deepspeed.zero_stage == "auto"
    for stage in range(4):
        cfg = load_config(None, [f"deepspeed.zero_stage={stage}"])
        choice = resolve_zero_stage(cfg, 1, on_gpu=False)
        assert choice.stage == stage and "set in the config" in choice.reason
        assert build_ds_config(cfg, 2, False)["zero_optimization"]["stage"] == stage
    with pytest.raises(Exception, match="deepspeed.zero_stage: 4 is not one of auto, 0, 1, 2, 3"):
        load_config(None, ["deepspeed.zero_stage=4"])


@pytest.mark.parametrize("flavor, ranks, gib, offload, stage", [
    ("base", 1, 80, False, 1),  # one H100: nothing to partition, stage 1 is the cheapest ZeRO layout
    ("base", 8, 80, False, 1),
    ("large", 8, 80, False, 1),
    ("large", 2, 16, False, 2),  # small GPUs: stage 1 no longer fits, stage 2 does
    ("large", 4, 8, False, 3),  # smaller still: only stage 3 fits
    ("xl", 8, 80, True, 3),  # configs/xl.yaml offloads the optimizer
    ("base", 8, 80, True, 3),  # any offload
])
def test_auto_picks_the_cheapest_stage_that_fits(flavor, ranks, gib, offload, stage):
    cfg = load_config(None, [f"model.flavor={flavor}"])
    choice = choose_stage(parameter_count(cfg), ranks, True, gib * GiB, 0.5, offload_optimizer=offload)
    assert choice.stage == stage, choice.reason
    assert f"{ranks} rank(s)" in choice.reason and "budget" in choice.reason


@pytest.mark.parametrize("ranks, bf16, offload, stage", [
    (1, False, False, 0),  # fp32 or autocast on one rank: nothing to partition, DeepSpeed steps torch's AdamW
    (1, True, False, 1),  # DeepSpeed's bf16 optimizer keeps a layout stage0.py does not convert
    (2, False, False, 1),
    (1, False, True, 3),  # offload needs ZeRO
])
def test_one_rank_without_deepspeed_bf16_gets_stage_0(ranks, bf16, offload, stage):
    cfg = load_config(None, ["model.flavor=base"])
    choice = choose_stage(parameter_count(cfg), ranks, bf16, 80 * GiB, 0.5, offload_optimizer=offload)
    assert choice.stage == stage, choice.reason
    for precision in ("fp32", "autocast"):  # neither is DeepSpeed's bf16 mode
        cfg = load_config(None, [f"deepspeed.precision={precision}", "model.flavor=debug"])
        assert resolve_zero_stage(cfg, 1, on_gpu=False).stage == 0


def test_a_stage_0_checkpoint_without_parameter_names_says_how_to_resume_it(tmp_path):
    from trainer.checkpointing.stage0 import MODEL_STATES, stage0_to_universal

    (tmp_path / "ds").mkdir()
    optimizer = {"state": {}, "param_groups": [{"params": [0]}]}
    torch.save({"module": {"w": torch.zeros(2)}, "optimizer": optimizer}, tmp_path / "ds" / MODEL_STATES)
    with pytest.raises(ValueError, match="does not name its optimizer's parameters.*deepspeed.zero_stage=0"):
        stage0_to_universal(tmp_path / "ds", tmp_path / "out")


def test_a_parameter_adam_never_stepped_gets_zero_moments_and_its_group_s_step(tmp_path):
    """A head whose objective has not trained yet has no state in torch's AdamW; the universal form gives it
    what a ZeRO optimizer holds (its flat state covers it): zero moments and the group's step, which
    DeepSpeed's load requires of every parameter in a group. A group nothing in which has trained gets
    weights only."""
    from trainer.checkpointing.stage0 import MODEL_STATES, PARAM_NAMES_KEY, stage0_to_universal

    (tmp_path / "ds").mkdir()
    weights = {"a": torch.ones(3), "b": torch.ones(1), "head": torch.full((2,), 2.0),
               "frozen": torch.zeros(4)}
    trained = {"step": torch.tensor(5.0), "exp_avg": torch.full((3,), 0.1),
               "exp_avg_sq": torch.full((3,), 0.2)}
    later = {"step": torch.tensor(3.0), "exp_avg": torch.zeros(1),  # a parameter that joined later
             "exp_avg_sq": torch.zeros(1)}
    optimizer = {"state": {0: trained, 1: later},
                 "param_groups": [{"params": [0, 1, 2], "lr": 1.0}, {"params": [3]}]}
    torch.save({"module": weights, "optimizer": optimizer,
                PARAM_NAMES_KEY: [["a", "b", "head"], ["frozen"]]}, tmp_path / "ds" / MODEL_STATES)
    stage0_to_universal(tmp_path / "ds", tmp_path / "out")
    zero = tmp_path / "out" / "zero"

    def load(name, key):
        return torch.load(zero / name / f"{key}.pt", weights_only=False)

    assert torch.equal(load("a", "exp_avg")["param"], trained["exp_avg"]) and load("a", "step") == 5
    assert load("b", "step") == 5  # one step per group, its largest, as a ZeRO optimizer counts
    assert torch.equal(load("head", "exp_avg_sq")["param"], torch.zeros(2)) and load("head", "step") == 5
    assert torch.equal(load("head", "fp32")["param"], weights["head"])
    assert sorted(p.name for p in (zero / "frozen").iterdir()) == ["fp32.pt"]
    lean = torch.load(tmp_path / "out" / MODEL_STATES, weights_only=False)
    assert lean["optimizer"] is None and PARAM_NAMES_KEY not in lean  # the state lives under zero/ now


def test_a_stage_0_resume_puts_adam_s_state_where_torch_keeps_it_and_refuses_a_wrapped_optimizer(tmp_path):
    """load_universal_into_plain on parameters of another device than the files' (meta here, a GPU in a
    job): the moments go beside the parameter, the step too where the group is fused (torch's Adam keeps it
    there), else on the CPU; each parameter its own step tensor. DeepSpeed's bf16 wrapper is refused."""
    from types import SimpleNamespace

    from trainer.checkpointing.stage0 import MODEL_STATES, load_universal_into_plain

    module = torch.nn.Module()
    module.w, module.v = (torch.nn.Parameter(torch.zeros(3, device="meta")) for _ in range(2))
    optimizer = torch.optim.AdamW([{"params": [module.w], "fused": True}, {"params": [module.v]}])
    folder = tmp_path / "ds_universal"
    for name in ("w", "v"):
        (folder / "zero" / name).mkdir(parents=True)
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            torch.save({"param": torch.ones(3)}, folder / "zero" / name / f"{key}.pt")
        torch.save(torch.tensor(4.0), folder / "zero" / name / "step.pt")
    torch.save({"module": {}, "global_steps": 4}, folder / MODEL_STATES)
    engine = SimpleNamespace(module=module, optimizer=optimizer, basic_optimizer=optimizer)
    load_universal_into_plain(engine, folder)
    w, v = optimizer.state[module.w], optimizer.state[module.v]
    assert w["exp_avg"].device.type == v["exp_avg_sq"].device.type == "meta"
    assert (w["step"].device.type, v["step"].device.type) == ("meta", "cpu")
    assert w["step"] is not v["step"] and float(v["step"]) == 4 and engine.global_steps == 4
    wrapped = SimpleNamespace(module=module, optimizer=object(), basic_optimizer=optimizer)
    with pytest.raises(ValueError, match="deepspeed.zero_stage=1, or deepspeed.precision=autocast"):
        load_universal_into_plain(wrapped, folder)


def test_stage_memory_shrinks_with_the_stage_and_nothing_fits_without_offload_says_so():
    p = 860_000_000
    per_stage = [state_bytes_per_rank(p, 8, s, bf16=True) for s in range(4)]
    assert per_stage == sorted(per_stage, reverse=True) and per_stage[0] == 16 * p
    # fp32 stage 0: weights, gradients and Adam's two moments, 4 bytes each; no master copy (the torch
    # optimizer steps the weights), unlike stages 1-3, whose flat fp32 partitions are one
    assert state_bytes_per_rank(p, 1, 0, bf16=False) == 16 * p < state_bytes_per_rank(p, 1, 1, bf16=False)
    choice = choose_stage(p, 1, True, 16 * GiB, 0.5)
    assert choice.stage == 3 and "offload_optimizer=true" in choice.reason


def test_shipped_configs_resolve_on_cpu():
    # debug sets 3, so that the integration tests built on it keep exercising ZeRO-3; the others are auto
    for name, stage in (("debug", 3), ("small", 1)):
        cfg = load_config(f"configs/{name}.yaml", [])
        assert resolve_zero_stage(cfg, cfg.scaling.num_workers, on_gpu=False).stage == stage
    for name in ("small", "base", "large", "xl"):
        assert load_config(f"configs/{name}.yaml", []).deepspeed.zero_stage == "auto", name


def test_zero3_sizes_follow_the_hidden_size_unless_set():
    small = zero3_sizes(load_config(None, ["model.flavor=large"]))
    xl = zero3_sizes(load_config(None, ["model.flavor=xl"]))
    assert small["param_persistence_threshold"] == 100_000  # DeepSpeed's default is the floor
    wide = zero3_sizes(load_config(None, ["model.flavor=xl", "model.text.dim=8192"]))
    assert wide["param_persistence_threshold"] == 16 * 8192
    assert xl["reduce_bucket_size"] == 4 * 12 * 2048**2 > small["reduce_bucket_size"]
    set_ = load_config(None, ["deepspeed.zero_stage=3", "deepspeed.reduce_bucket_size=123"])
    assert build_ds_config(set_, 1, False)["zero_optimization"]["reduce_bucket_size"] == 123


# ------------------------------------------------------------------------------------ cross-stage resume

STEPS, SAVE_AT, GLOBAL = 4, 2, 2  # GLOBAL micro-batches per step: two ranks, or one rank accumulating two


class _Reporter:
    def report(self, metrics, checkpoint_dir, step) -> None: ...

    def latest_checkpoint(self):
        return None


class _Loader:
    def state_dict(self) -> dict:
        return {"version": 1}


def _gathered(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: p.detach().clone() for name, p in params.items()}


def _moments(engine) -> dict[str, torch.Tensor]:
    """Adam's moments of every parameter, whole (ZeRO gathers its partitions: every rank must call this)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    optimizer = engine.optimizer
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        # stages 1-2: link each parameter's part of the flat state as it is now (DeepSpeed links it only once)
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    out = {}
    for name, p in engine.module.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            value = (engine.optimizer.state[p][key] if engine.zero_optimization_stage() == 0
                     else safe_get_full_optimizer_state(p, key))
            out[f"{name}:{key}"] = value.detach().clone()
    return out


def _group_settings(optimizer) -> list[tuple]:
    return [(g["weight_decay"], tuple(g["betas"]), g["eps"]) for g in optimizer.param_groups]


def _publish(root: Path, step_dir: Path) -> None:
    """Every rank's shards into one step folder, as the run's storage holds them."""
    import torch.distributed as dist

    shutil.copytree(root, step_dir, dirs_exist_ok=True)
    shutil.rmtree(root, ignore_errors=True)
    dist.barrier()


def _run(rank: int, port: int, run_dir: str, stage: int, resume: bool, out: str, world: int,
         extra: tuple[str, ...] = ()) -> None:
    """One rank: a fresh run saving at SAVE_AT, or a resume of it (with config overrides ``extra``); trains to
    STEPS and records weights/losses."""
    import os

    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from tests.trainer.test_objectives import ALL, make_batch, make_model
    from trainer import checkpoint as ckpt
    from trainer.loop import Trainer, build_engine
    from trainer.objectives import PretrainObjectives
    from trainer.zero_stage import needs_universal

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = load_config(None, [f"deepspeed.zero_stage={stage}", f"train.global_micro_batches={GLOBAL}",
                             f"scaling.num_workers={world}", "run.name=zs", "optimizer.lr=0.01",
                             "optimizer.schedule=constant", "optimizer.warmup_steps=0",
                             "model.text.bos_token_id=2", "model.text.eos_token_id=3",
                             "model.text.mask_token_id=4", *extra])
    trainer = Trainer(cfg, rank, world, _Reporter(), control_dir=run_dir)
    trainer.loader = _Loader()
    manager = trainer.checkpoints
    found = manager.find() if resume else None
    record: dict = {"universal": found is not None and needs_universal((found.local, found.state), cfg, world,
                                                                       False)}
    trainer.module = PretrainObjectives(make_model(), rank, world)  # Trainer.build without the tokenizer
    trainer.engine, trainer.optimizer, trainer.group_modules = build_engine(cfg, trainer.module, world, False,
                                                                            record["universal"])
    record["stage"] = trainer.engine.zero_optimization_stage()
    record["groups"] = _group_settings(trainer.optimizer)
    if found is not None:
        trainer.progress = manager._restore(trainer.engine, found)
        record["restored_groups"] = _group_settings(trainer.optimizer)
        record["restored_clip"] = getattr(trainer.engine.optimizer, "clip_grad", None)  # ZeRO's own copy
        record["restored"] = _gathered(trainer.engine)
        record["restored_moments"] = _moments(trainer.engine)
        inner = getattr(trainer.engine.optimizer, "optimizer", trainer.engine.optimizer)  # torch optimizer
        record["restored_steps"] = {float(st["step"]) for st in inner.state.values() if "step" in st}
    losses = []
    for step in range(trainer.progress.step, STEPS):
        if step == SAVE_AT and not resume:
            record["saved"] = _gathered(trainer.engine)
            record["saved_moments"] = _moments(trainer.engine)
            _publish(manager.save_local(step, trainer.engine, trainer.loader, trainer.progress.extra),
                     Path(run_dir) / "checkpoints" / ckpt.step_dir_name(step))
        accum = GLOBAL // world
        loss = 0.0
        for micro in range(accum):  # the step's GLOBAL micro-batches over the ranks, at any world size
            batch = make_batch(seed=100 * step + rank * accum + micro)
            loss += trainer.forward_backward(batch, ALL)[0] / accum
            trainer.engine.step()
        mean = torch.tensor([loss / world])
        dist.all_reduce(mean)  # the step's loss over the global batch
        losses.append(float(mean))
    record["losses"], record["final"] = losses, _gathered(trainer.engine)
    import sys

    record["inductor_backend"] = "torch._inductor.compile_fx" in sys.modules
    # whether MLflow was imported (this run tracks nothing, like a job's ranks but the first of each node;
    # DeepSpeed's autotuner imported it), and whether `import mlflow` would still find it (no None left in
    # sys.modules, which makes an import fail)
    import importlib.util

    record["mlflow"] = ("mlflow" in sys.modules, sys.modules.get("mlflow", "absent") is not None
                        and importlib.util.find_spec("mlflow") is not None)
    if rank == 0:
        torch.save(record, out)
    dist.destroy_process_group()


def _spawn(tmp_path: Path, stage: int, resume: bool, world: int, extra: tuple[str, ...] = ()) -> dict:
    out = tmp_path / f"{stage}-{resume}.pt"
    mp.start_processes(_run, args=(free_port(), str(tmp_path / "run"), stage, resume, str(out), world, extra),
                       nprocs=world, join=True, start_method="spawn")
    return torch.load(out)


@pytest.mark.integration  # one or two ranks over gloo in spawned processes
@pytest.mark.parametrize("saved, resumed", [
    # each conversion (DeepSpeed's of stages 3 and 1, stage0.py's of stage 0) into each load (stage0.py's,
    # DeepSpeed's of stages 1 and 3) that needs pieces of its own (make_loadable_under_any_stage); (stage,
    # world size)
    ((3, 1), (1, 1)),
    ((3, 1), (0, 1)),
    # stage 0 (auto on one rank) on two ranks under stage 1: DeepSpeed's load on a rank that holds no part of
    # the 1-element groups (zero_stage._groups_this_rank_holds)
    ((0, 1), (1, 2)),
    ((1, 2), (3, 1)),  # what a stage-1 conversion leaves out and a stage-3 load reads (make_loadable_...)
], ids=["3-1", "3-0", "0-1x2", "1x2-3"])
def test_checkpoint_resumes_under_another_stage(tmp_path, saved, resumed):
    """Saved at step 2 under one stage (and world size), resumed under the other through the universal
    checkpoint: the weights come back bitwise, and the resumed steps match the uninterrupted run (same losses,
    same final weights up to the stages' and world sizes' different reduction order), which they would not
    with lost Adam moments."""
    pytest.importorskip("deepspeed")
    (saved, saved_world), (resumed, resumed_world) = saved, resumed
    first = _spawn(tmp_path, saved, resume=False, world=saved_world)
    second = _spawn(tmp_path, resumed, resume=True, world=resumed_world)
    assert (first["stage"], second["stage"]) == (saved, resumed) and second["universal"]
    # an engine build, steps, a save and a resume under stages 1 and 3 never load inductor's backend (it costs
    # ~1 CPU-s per worker start; DeepSpeed's Muon checks loaded it: trainer/ds_extensions.py)
    assert not first["inductor_backend"] and not second["inductor_backend"]
    # nor MLflow, in a process that tracks nothing (~0.7 CPU-s per worker start but the first of each node's:
    # trainer/ds_extensions.import_deepspeed), and MLflow stays importable
    assert first["mlflow"] == second["mlflow"] == (False, True), (first["mlflow"], second["mlflow"])
    assert first["saved"].keys() == second["restored"].keys()
    assert all(torch.equal(first["saved"][k], second["restored"][k]) for k in first["saved"])
    assert second["restored_groups"] == first["groups"]  # each group's own weight decay, betas, eps
    moments = first["saved_moments"]
    assert moments.keys() == second["restored_moments"].keys()
    differ = [k for k in moments if not torch.equal(moments[k], second["restored_moments"][k])]
    assert not differ, f"{len(differ)} of {len(moments)} Adam moments differ after the resume: {differ[:3]}"
    assert second["restored_steps"] == {float(SAVE_AT)}  # Adam's step count, for its bias correction
    if saved_world != resumed_world:
        # contrastive negatives come from the other rank's batch on two ranks, not from the micro-batch's own
        # on one, and each rank draws its own masks: the runs' losses differ from here on by design
        return
    assert second["losses"] == pytest.approx(first["losses"][SAVE_AT:], rel=1e-5)
    # 1e-5: the two stages reduce and clip in another order (measured up to 5e-6 on weights of ~0.1); a group
    # resumed with another group's weight decay, or lost Adam moments, is 10-100x further off
    far = [k for k in first["final"] if not torch.allclose(first["final"][k], second["final"][k],
                                                          rtol=1e-4, atol=1e-5)]
    assert not far, f"{len(far)} weights differ from the uninterrupted run, e.g. {far[:3]}"
    moved = [k for k in first["final"] if not torch.equal(first["final"][k], first["saved"][k])]
    assert len(moved) > len(first["final"]) // 2, "the steps after the save did not train"


@pytest.mark.integration  # one rank over gloo in spawned processes
def test_a_resume_with_changed_optimizer_settings_trains_with_them(tmp_path):
    """The checkpoint holds the optimizer's state, the run's config its settings: resumed at the same stage
    and world size (DeepSpeed's direct load, torch's load_state_dict inside it) with another weight decay,
    betas, eps and gradient clip, the optimizer has the new ones. The load used to bring back the saved ones
    (and ZeRO-1/2's clip) while the printed config showed the new; the Adam state still comes back."""
    pytest.importorskip("deepspeed")
    first = _spawn(tmp_path, 1, resume=False, world=1)
    changed = ("optimizer.weight_decay=0.05", "optimizer.beta2=0.95", "optimizer.eps=1e-8",
               "optimizer.grad_clip=0.5")
    second = _spawn(tmp_path, 1, resume=True, world=1, extra=changed)
    assert not second["universal"] and second["stage"] == 1
    assert second["groups"] != first["groups"]  # the new settings, as built
    assert second["restored_groups"] == second["groups"]  # and kept through the load
    assert {wd for wd, _, _ in second["restored_groups"]} == {0.0, 0.05}
    assert second["restored_clip"] == 0.5
    assert all(torch.equal(first["saved_moments"][k], v) for k, v in second["restored_moments"].items())
    assert second["restored_steps"] == {float(SAVE_AT)}


def test_autocast_precision_and_compile_settings():
    cfg = load_config(None, ["deepspeed.precision=autocast", "train.compile=true", "deepspeed.zero_stage=1"])
    ds = build_ds_config(cfg, 1, on_gpu=True)
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in ds
    assert cfg.train.compile is True


def test_choice_is_printed_and_logged_as_mlflow_params(capsys):
    from trainer.zero_stage import ZeroChoice, announce

    class Client:  # the two MLflow client calls announce makes
        def __init__(self):
            self.params, self.tags = {}, {}

        def log_batch(self, run_id, params):
            self.params.update({p.key: p.value for p in params})

        def set_tag(self, run_id, key, value):
            self.tags[key] = value

    class Logger:  # trainer.metric_logger.MetricLogger.call runs fn(client, run_id) on its thread
        def __init__(self):
            self.client = Client()

        def call(self, fn, what):
            fn(self.client, "run-1")

    logger = Logger()
    announce(ZeroChoice(1, "stage 1 fits: 0.1 GiB/rank"), rank=0, metrics_logger=logger)
    assert "[unimo] ZeRO stage 1: stage 1 fits: 0.1 GiB/rank" in capsys.readouterr().out
    assert logger.client.params == {"deepspeed.zero_stage_chosen": "1",
                                    "deepspeed.zero_stage_reason": "stage 1 fits: 0.1 GiB/rank"}
    assert logger.client.tags == {"unimo.zero_stage": "1"}
    announce(ZeroChoice(3, "x"), rank=1, metrics_logger=logger)  # only rank 0 speaks
    assert capsys.readouterr().out == "" and logger.client.tags == {"unimo.zero_stage": "1"}
    announce(ZeroChoice(3, "x"), rank=0, metrics_logger=None, whole_units=True)
    assert capsys.readouterr().out == ("[unimo] ZeRO stage 3: x; whole blocks, embeddings and heads gathered "
                                       "at once (deepspeed.zero3_whole_units)\n")


def test_the_saved_stage_comes_from_the_manifest_of_a_partial_copy(tmp_path):
    """A resuming node's copy of an S3 checkpoint may hold no shard yet (trainer/checkpoint.py partial_copy):
    the stage is read from the file names the manifest lists, else from the folder."""
    from trainer import checkpoint as ckpt
    from trainer.zero_stage import saved_zero_stage

    names = {"ds/zero_pp_rank_1_mp_rank_00_model_states.pt": 3,
             "ds/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt": 1, "ds/mp_rank_00_model_states.pt": 0}
    for rel, stage in names.items():
        copy = tmp_path / str(stage)
        copy.mkdir()
        listed = {rel: {"size": 1, "sha256": "-"}, ckpt.STATE: {"size": 1, "sha256": "-"}}
        ckpt.write_manifest(copy, listed, 4)
        assert saved_zero_stage(copy) == stage and not (copy / "ds").exists()
    (tmp_path / "local" / "ds").mkdir(parents=True)
    (tmp_path / "local" / "ds" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x")
    assert saved_zero_stage(tmp_path / "local") == 3  # no manifest: the folder's names


# ------------------------------------------------------------------------------- stage 0 as the plain loop

def _stage0_against_plain(rank: int, port: int, out: str) -> None:
    """One gloo rank: the trainer's stage-0 engine and the plain PyTorch loop (the same groups, fused AdamW
    and clip) from the same initial weights over the same batches; records both runs' weights and norms."""
    import os

    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch.distributed as dist

    from tests.trainer.test_objectives import ALL, make_batch, make_model
    from trainer.engine import param_groups
    from trainer.loop import build_engine
    from trainer.objectives import PretrainObjectives
    from trainer.optim import build_adamw

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    # grad_clip 0.05: far below these gradients' norms, so every step clips
    cfg = load_config(None, ["deepspeed.zero_stage=auto", "train.global_micro_batches=1",
                             "scaling.num_workers=1", "optimizer.lr=0.01", "optimizer.grad_clip=0.05"])
    batches = [make_batch(seed=40 + i) for i in range(3)]
    engine, _, _ = build_engine(cfg, PretrainObjectives(make_model()), 1, False)
    plain = PretrainObjectives(make_model())
    groups = [{k: v for k, v in g.items() if k != "module"} for g in param_groups(plain.model, 0.01)]
    opt = build_adamw(groups, cfg.optimizer)
    record = {"stage": engine.zero_optimization_stage(), "engine_norms": [], "plain_norms": []}
    for i, batch in enumerate(batches):
        torch.manual_seed(i)  # the same dropout and masking draws in both
        total, _ = engine(batch, ALL)
        engine.backward(total)
        engine.step()
        record["engine_norms"].append(float(engine.get_global_grad_norm()))
        torch.manual_seed(i)
        total, _ = plain(batch, ALL)
        total.backward()
        record["plain_norms"].append(float(torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.05)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    record["engine"] = {k: v.detach().clone() for k, v in engine.module.named_parameters()}
    record["plain"] = {k: v.detach().clone() for k, v in plain.named_parameters()}
    # a step without one objective (a curriculum stage): its head gets no gradient from autograd; as on
    # several ranks and under ZeRO, it gets a zero one, so AdamW still steps it (weight decay included)
    total, _ = engine(batches[0], {k: v for k, v in ALL.items() if k != "itm"})
    engine.backward(total)
    record["without_grad"] = [k for k, p in engine.module.named_parameters() if p.grad is None]
    before = {k: p.detach().clone() for k, p in engine.module.named_parameters()}
    engine.step()
    record["head_moved"] = [k for k, p in engine.module.named_parameters()
                            if "itm" in k and not torch.equal(before[k], p)]
    torch.save(record, out)
    dist.destroy_process_group()


@pytest.mark.integration  # a DeepSpeed engine over gloo in a spawned process
def test_stage_0_on_one_rank_steps_exactly_as_the_plain_loop_and_reports_its_grad_norm(tmp_path):
    """`auto` on one rank (fp32) is stage 0, which the trainer runs without DeepSpeed's own clip loop and
    one-rank all-reduce (trainer/engine.py lighten_plain_engine): the weights after three clipped steps are
    bitwise those of the plain loop, and the engine reports the gradient norm (DeepSpeed kept none at stage
    0: the metrics' grad_norm was NaN). A head whose objective is off still gets stepped, as under ZeRO."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "plain.pt"
    mp.start_processes(_stage0_against_plain, args=(free_port(), str(out)), nprocs=1, join=True,
                       start_method="spawn")
    record = torch.load(out)
    assert record["stage"] == 0
    assert record["without_grad"] == [] and record["head_moved"], record["head_moved"]
    assert record["engine_norms"] == record["plain_norms"] and all(n > 0.05 for n in record["plain_norms"])
    assert record["engine"].keys() == record["plain"].keys()
    differ = [k for k in record["plain"] if not torch.equal(record["engine"][k], record["plain"][k])]
    assert not differ, f"{len(differ)} weights differ from the plain loop's, e.g. {differ[:3]}"
