"""bench/learn.py's caption score: a generated caption's first colour-shape pair against what the image shows
(any of its held-out captions), counted as a pair and as colour and shape alone."""

from __future__ import annotations

import torch

from bench import learn


def test_a_caption_scores_its_first_colour_shape_pair_against_every_caption_of_its_image():
    full = {"text_image_index": torch.tensor([0, 0, 1]),
            "captions": ["a red square on the left and two blue triangles", "there is a red square",
                         "two blue circles at the top"]}
    generated = ["a picture of two blue triangles, with a red circle",  # image 0: its 2nd group's pair
                 "a picture of a red circle",  # image 1 (blue circles): the shape only
                 "a picture of a blue square"]  # image 2 has no held-out caption: nothing shown
    assert learn.concepts(generated[0]) == [("blue", "triangle"), ("red", "circle")]
    hits = learn.caption_hits(generated, full)
    assert hits == {"colour_shape": round(1 / 3, 3), "colour": round(1 / 3, 3), "shape": round(2 / 3, 3)}
    # the colour right with another group's shape: colour and shape each count, the pair does not
    assert learn.caption_hits(["a red triangle"], full) == {"colour_shape": 0.0, "colour": 1.0, "shape": 1.0}
