"""A check the data-cursor tests share: a run cut and resumed delivers what an uninterrupted run delivers."""

from __future__ import annotations

import torch

from data_pipeline.config import SOURCES


def assert_resume_is_exact(before: list, after: list, full: list) -> None:
    """Per rank, (counts, batches) taken before the cut plus after the resume equal the uninterrupted run's:
    the same number of samples of each source, and every tensor of every batch bit for bit."""
    for rank, (b, a, f) in enumerate(zip(before, after, full)):
        for s in SOURCES:
            assert b[0][s] + a[0][s] == f[0][s], (rank, s)
        for got, want in zip(b[1] + a[1], f[1]):
            for s in SOURCES:
                for key in got[s]:
                    assert torch.equal(got[s][key], want[s][key]), (rank, s, key)
