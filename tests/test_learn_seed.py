"""bench/learn.py --seed: one number sets the initialisation's and the data's seeds."""

from __future__ import annotations

from bench import learn

URLS = {k: f"/tmp/none/{k}" for k in ("text", "image", "pair", "eval", "tokenizer")}


def test_seed_sets_run_and_data_seeds_and_later_overrides_win():
    cfg = learn.build_config(str(learn.ROOT / "configs" / "debug.yaml"), learn.seed_overrides(3), URLS)
    assert (cfg.run.seed, cfg.data.seed) == (3, 3)
    cfg = learn.build_config(str(learn.ROOT / "configs" / "debug.yaml"),
                             learn.seed_overrides(3) + ["data.seed=5"], URLS)
    assert (cfg.run.seed, cfg.data.seed) == (3, 5)
    assert learn.seed_overrides(None) == []
    default = learn.build_config(str(learn.ROOT / "configs" / "debug.yaml"), [], URLS)
    assert (default.run.seed, default.data.seed) == (0, 0)
