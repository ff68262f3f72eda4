"""The lesson-00 checkers accept right answers and reject wrong ones."""

import pytest

from dalle_lesson import data
from dalle_lesson.exercises import lesson00


def test_caption_count():
    scene = data.ShapesDataset(length=50, image_size=32).scene(0)
    lesson00.check_caption_count(scene, len(set(data.scene_captions(scene))))
    with pytest.raises(AssertionError, match="different captions"):
        lesson00.check_caption_count(scene, len(set(data.scene_captions(scene))) + 1)


def test_held_out_parts():
    shape, colour = sorted(data.HELD_OUT_PAIRS)[0]
    dataset = data.ShapesDataset(length=200, image_size=32, split="train")
    with_shape = [i for i in range(200) if any(o.shape == shape for o in dataset.scene(i).objects)]
    with_colour = [i for i in range(200) if any(o.colour == colour for o in dataset.scene(i).objects)]
    lesson00.check_held_out_parts((shape, colour), with_shape, with_colour, length=200)
    with pytest.raises(AssertionError, match=f"hold a {shape}"):
        lesson00.check_held_out_parts((shape, colour), with_shape[1:], with_colour, length=200)
    with pytest.raises(AssertionError, match="not a held-out pair"):
        lesson00.check_held_out_parts(("circle", "red"), with_shape, with_colour, length=200)


def test_generation_speed_wants_milliseconds():
    with pytest.raises(AssertionError, match="milliseconds"):
        lesson00.check_generation_speed(0.0001, 0.004)  # seconds typed as milliseconds
