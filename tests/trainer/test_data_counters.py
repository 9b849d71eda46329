"""The loader's skip and retry counters reach the step metrics (and so MLflow), summed over ranks."""

from __future__ import annotations

import torch.distributed as dist

from trainer.config import load_config
from trainer.loop import StepResult, Trainer


class _Loader:
    def __init__(self, stats):
        self._stats = stats

    def stats(self):
        return dict(self._stats)


def _metrics(monkeypatch, world_size: int, stats: dict) -> dict:
    trainer = Trainer(load_config(None, []), rank=0, world_size=world_size, reporter=None)
    trainer.loader = _Loader(stats)
    # Every other rank saw the same: the all-reduce (a SUM) multiplies the vector by the world size.
    monkeypatch.setattr(dist, "all_reduce", lambda vec, *a, **k: vec.mul_(world_size))
    result = StepResult(losses={"itc": 2.0}, total=2.0, samples={"pair": 4}, step_time=0.1, data_time=0.01)
    return trainer.reduce_metrics(result)


def test_skips_and_retries_are_metrics(monkeypatch):
    stats = {"skipped_bad_image": 2, "skipped_truncated_shard": 1, "skipped_some_new_reason": 4,
             "read_retries": 5, "samples_pair": 40, "bytes_read": 1000}
    m = _metrics(monkeypatch, 1, stats)
    assert m["pipeline/skipped_bad_image"] == 2 and m["pipeline/skipped_truncated_shard"] == 1
    # every reason is always there: ranks all-reduce one vector
    assert m["pipeline/skipped_missing_field"] == 0
    assert m["pipeline/skipped_total"] == 7 and m["pipeline/read_retries"] == 5
    assert m["loss/itc"] == 2.0 and m["loss/total"] == 2.0


def test_counters_are_summed_and_losses_averaged_over_ranks(monkeypatch):
    m = _metrics(monkeypatch, 2, {"skipped_empty_text": 3})
    assert m["pipeline/skipped_empty_text"] == 6 and m["pipeline/skipped_total"] == 6
    assert m["loss/itc"] == 2.0 and m["loss/total"] == 2.0


class _CorporaLoader(_Loader):
    def corpus_weights(self):
        return {"pair/coco": 0.25, "pair/vg": 0.75, "text": 1.0}


def test_per_corpus_samples_epochs_skips_and_shares_are_metrics(monkeypatch):
    trainer = Trainer(load_config(None, []), rank=0, world_size=2, reporter=None)
    trainer.loader = _CorporaLoader({"corpus/pair/coco/samples": 30, "corpus/pair/vg/samples": 90,
                                     "corpus/pair/vg/epoch": 3, "corpus/text/samples": 8,
                                     "corpus/pair/coco/skipped_not_a_tar": 1, "skipped_not_a_tar": 1})
    monkeypatch.setattr(dist, "all_reduce", lambda vec, *a, **k: vec.mul_(2))
    m = trainer.reduce_metrics(StepResult(losses={"itc": 1.0}, total=1.0, samples={"pair": 4}, step_time=0.1,
                                          data_time=0.01))
    assert m["pipeline/corpus/pair/coco/samples"] == 60 and m["pipeline/corpus/pair/vg/samples"] == 180
    assert m["pipeline/corpus/pair/vg/epoch"] == 3  # the mean over ranks, not their sum
    assert m["pipeline/corpus/pair/coco/share"] == 0.25 and m["pipeline/corpus/pair/coco/weight"] == 0.25
    assert m["pipeline/corpus/text/share"] == 1.0
    assert m["pipeline/corpus/pair/coco/skipped_not_a_tar"] == 2 and m["pipeline/skipped_not_a_tar"] == 2
    # every name on every rank: one all-reduce vector
    assert m["pipeline/corpus/pair/vg/skipped_bad_image"] == 0


def test_corpus_weights_are_run_params():
    from trainer.redaction import safe_params

    cfg = load_config(None, ["data.pair.corpora=[{name: coco, urls: s3://b/coco/, weight: 1}, "
                             "{name: sbu, urls: 'http://u:pw@h/sbu/', weight: 3}]"])
    params = safe_params(cfg, [])
    assert params["data.weights.pair.coco"] == "0.25" and params["data.weights.pair.sbu"] == "0.75"
    assert "pw@" not in params["data.pair.corpora"]


class _Logger:
    def __init__(self):
        self.sent: list[tuple[int, dict]] = []

    def log(self, metrics, step):
        self.sent.append((step, dict(metrics)))


def test_data_counters_go_to_mlflow_when_they_change(capsys):
    from trainer.tracking import RunTracker

    trainer = Trainer(load_config(None, []), rank=0, world_size=1, reporter=None)
    trainer.tracker = RunTracker(metrics=_Logger())
    trainer.metrics_logger = trainer.tracker.metrics
    base = {"loss/total": 2.0, "lr": 1e-3}
    for step, skipped in ((1, 0.0), (2, 0.0), (3, 2.0), (4, 2.0)):
        trainer._log({**base, "pipeline/skipped_total": skipped, "pipeline/read_retries": 0.0}, step, "main",
                     0.0, 0)
    sent = dict(trainer.metrics_logger.sent)
    assert all("loss/total" in m for m in sent.values())  # the rest goes every time
    # the first log, then a change
    assert [s for s, m in sent.items() if "pipeline/skipped_total" in m] == [1, 3]
    assert [s for s, m in sent.items() if "pipeline/read_retries" in m] == [1]
    assert sent[3]["pipeline/skipped_total"] == 2.0
