"""The synthetic world's geometry: every shape on the board of cells (the debug model's 8 px patches at 48
px), inside its group's half, none overlapping (docs/LEARNING.md, "Shapes, session 16")."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from data_pipeline.synthetic import GRID, PALETTE, REGIONS, SIZES, _draw, _layouts, _scene


@pytest.mark.parametrize("where", sorted(REGIONS))
def test_every_group_has_placements_all_inside_its_half_and_apart(where):
    x0, y0, x1, y1 = REGIONS[where]
    for (size, k), count in itertools.product(SIZES.items(), (1, 2, 3)):
        layouts = _layouts(where, k, count)
        assert layouts, (where, size, count)  # a scene can always be drawn
        for cells in layouts:
            assert len(set(cells)) == count
            assert all(x0 <= x <= x1 - k and y0 <= y <= y1 - k for x, y in cells)
            for a, b in itertools.combinations(cells, 2):
                assert abs(a[0] - b[0]) >= k or abs(a[1] - b[1]) >= k, (where, size, cells)
    # three large shapes fill a 3 x 6 half only in a row of three, each at either x: 2 ** 3 ways
    assert len(_layouts(where, SIZES["large"], 3)) == 8


def _cell_colour_share(img: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """(GRID, GRID): the share of each cell's pixels within 40 of ``colour`` in every channel."""
    near = (np.abs(img.astype(int) - np.array(colour)) <= 40).all(axis=-1)
    side = img.shape[0] // GRID
    return near.reshape(GRID, side, GRID, side).mean(axis=(1, 3))


@pytest.mark.parametrize("shape,low,high",
                         [("square", 0.95, 1.0), ("circle", 0.6, 0.9), ("triangle", 0.3, 0.7)])
def test_a_small_shape_is_drawn_inside_one_patch_of_a_48px_image(shape, low, high):
    rng = np.random.default_rng(0)
    for where in REGIONS:
        scene = [{"count": 1, "size": "small", "colour": "red", "shape": shape, "where": where}]
        share = _cell_colour_share(np.asarray(_draw(scene, 8 * GRID, rng)), PALETTE["red"])
        covered = np.argwhere(share > 0.05)
        assert len(covered) == 1, share  # one patch holds the whole shape, none of it spills into another
        (y, x), (x0, y0, x1, y1) = covered[0], REGIONS[where]
        assert x0 <= x < x1 and y0 <= y < y1
        assert low <= share[y, x] <= high  # a square fills its patch, a circle ~pi/4 of it, a triangle ~half


def test_a_large_shape_covers_a_block_of_2x2_patches_and_scenes_use_three_colours():
    rng = np.random.default_rng(1)
    scene = [{"count": 2, "size": "large", "colour": "blue", "shape": "square", "where": "top"}]
    share = _cell_colour_share(np.asarray(_draw(scene, 8 * GRID, rng)), PALETTE["blue"])
    assert (share > 0.95).sum() == 8 and (share > 0.05).sum() == 8 and share[3:].max() == 0
    colours = {g["colour"] for _ in range(300) for g in _scene(rng)}
    assert colours == set(PALETTE) and len(PALETTE) == 3
