"""Which of Ray Train's default callbacks a unimo job keeps (orchestrator/failure_policy.py): each left-out
one would start a helper actor process that the job never uses."""

from __future__ import annotations

from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from orchestrator.failure_policy import unused_helpers_left_out


class Kept:
    """Stands for every callback unimo keeps (backend set-up, accelerators, metrics, user callbacks)."""


def callbacks() -> list:
    # no constructor runs: only the class decides, and building the real ones needs a live Ray
    return [Kept(), DatasetsCallback.__new__(DatasetsCallback),
            PlacementGroupCleanerCallback.__new__(PlacementGroupCleanerCallback), Kept()]


def test_an_embedded_ray_keeps_neither_the_datasets_manager_nor_the_placement_group_cleaner():
    kept = unused_helpers_left_out(callbacks(), embedded=True)
    assert [type(cb) for cb in kept] == [Kept, Kept]


def test_a_cluster_keeps_the_placement_group_cleaner():
    # on a long-lived cluster it frees the workers' reservation of a controller that died
    kept = unused_helpers_left_out(callbacks(), embedded=False)
    assert [type(cb) for cb in kept] == [Kept, PlacementGroupCleanerCallback, Kept]
