"""Checkers for the exercises of lesson 00 (the overview and the data)."""

from __future__ import annotations

import time

from dalle_lesson.data import HELD_OUT_PAIRS, ShapesDataset, scene_captions
from dalle_lesson.exercises import correct, unanswered


def check_caption_count(scene, count: int | None) -> None:
    """Exercise 1: how many different captions the shapes set can give ``scene``."""
    if unanswered(count, expects="the number of different captions of the scene"):
        return
    want = len(set(scene_captions(scene)))
    assert count == want, (f"this scene has {want} different captions, not {count}: count the distinct strings "
                           f"(set(...)), every template with every synonym, in both directions")
    correct(f"{want} captions for one {len(scene.objects)}-object scene")


def _milliseconds_per_item(image_size: int, items: int = 20) -> float:
    dataset = ShapesDataset(length=items, image_size=image_size)
    start = time.perf_counter()
    for i in range(items):
        dataset[i]
    return 1000 * (time.perf_counter() - start) / items


def check_generation_speed(ms_per_item_32: float | None, ms_per_item_256: float | None) -> None:
    """Exercise 2: milliseconds to make one shapes item at 32x32 and at 256x256.

    Timings vary between machines and runs, so the check is loose: your numbers must be
    within a factor of 4 of what this checker measures now, on your machine."""
    if unanswered(ms_per_item_32, ms_per_item_256, expects="milliseconds per item at 32x32 and at 256x256"):
        return
    mine = {32: _milliseconds_per_item(32), 256: _milliseconds_per_item(256)}
    for size, theirs in ((32, ms_per_item_32), (256, ms_per_item_256)):
        assert mine[size] / 4 < theirs < mine[size] * 4, (
            f"at {size}x{size} this machine makes an item in about {mine[size]:.2f} ms, you measured {theirs:.2f}: "
            f"time many items (100) and divide; milliseconds, not seconds")
    assert ms_per_item_256 > ms_per_item_32, "a 256x256 item has 64 times the pixels: it cannot be faster"
    correct(f"{ms_per_item_32:.2f} ms at 32x32 and {ms_per_item_256:.2f} ms at 256x256: far less than a training "
            f"step, so drawing the data on the fly does not slow training")


def check_held_out_parts(pair, with_shape, with_colour, length: int = 2000) -> None:
    """Exercise 3: indices of ``ShapesDataset(length, 32, split="train")`` scenes holding the pair's
    shape, and those holding its colour; ``pair`` is ``(shape, colour)`` from ``HELD_OUT_PAIRS``."""
    if unanswered(with_shape, with_colour, expects="two lists of scene indices of the training split"):
        return
    shape, colour = pair
    assert (shape, colour) in HELD_OUT_PAIRS, f"{pair} is not a held-out pair; pick one of {sorted(HELD_OUT_PAIRS)}"
    dataset = ShapesDataset(length=length, image_size=32, split="train")
    objects = [dataset.scene(i).objects for i in range(length)]
    want_shape = [i for i, objs in enumerate(objects) if any(o.shape == shape for o in objs)]
    want_colour = [i for i, objs in enumerate(objects) if any(o.colour == colour for o in objs)]
    assert sorted(with_shape) == want_shape, (f"{len(want_shape)} of the {length} training scenes hold a {shape}, "
                                              f"your list has {len(with_shape)}: look at every object of every scene")
    assert sorted(with_colour) == want_colour, (f"{len(want_colour)} training scenes hold something {colour}, "
                                                f"your list has {len(with_colour)}")
    together = [i for i, objs in enumerate(objects) if any((o.shape, o.colour) == (shape, colour) for o in objs)]
    assert not together, f"scenes {together[:5]} hold a {colour} {shape}: the held-out split leaked into training"
    correct(f"{len(want_shape)} scenes with a {shape}, {len(want_colour)} with something {colour}, none with a "
            f"{colour} {shape}: the model learns both words, never together")
