"""Fixtures shared by the integration tests: one small synthetic data set per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """A small synthetic data set (pairs, text, images, eval, tokenizer) written once per test session."""
    from data_pipeline.synthetic import write_synthetic_dataset

    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(str(out), n_pairs=400, n_text=400, n_images=400, n_eval=100,
                            samples_per_shard=100)
    return out

