"""Tests of dalle_lesson.evaluate: the caption parser, the image reader and the scorer."""

import dataclasses
import math
import random

import pytest
import torch

from dalle_lesson import data, evaluate
from dalle_lesson.data import Scene, ShapeObject, ShapesDataset, pil_to_tensor, render_scene
from dalle_lesson.evaluate import parse_caption, read_image, read_relation, score, score_batch, summarize

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is fastest on a shared machine


def what_a_caption_says(scene: Scene) -> set:
    """A scene's kinds of objects and relation, said both ways round ("A left of B" = "B right of A")."""
    kinds = tuple((o.shape, o.colour, o.size) for o in scene.objects)
    if scene.relation is None:
        return {(kinds, None)}
    return {(kinds, scene.relation), (kinds[::-1], data.INVERSE_RELATION[scene.relation])}


def render(*objects: ShapeObject, relation: str | None = None, image_size: int = 32) -> torch.Tensor:
    return pil_to_tensor(render_scene(Scene(objects, relation), image_size))


# ---- reading captions ------------------------------------------------------------------


@pytest.mark.parametrize("split", data.SPLITS)
def test_every_caption_of_random_scenes_parses_back_to_the_scene(split):
    rng = random.Random(f"parse/{split}")
    for _ in range(700):
        scene = data.random_scene(rng, split)
        for caption in data.scene_captions(scene):
            parsed = parse_caption(caption)
            assert parsed is not None, caption
            assert what_a_caption_says(parsed) == what_a_caption_says(scene), caption


def test_every_caption_the_dataset_can_write_is_readable():
    captions = data.all_shapes_captions()  # every template, paraphrase and word
    unreadable = [caption for caption in captions if parse_caption(caption) is None]
    assert not unreadable, unreadable[:5]


def test_canonical_caption_and_dataset_captions_parse():
    dataset = ShapesDataset(200, 32, split="heldout", seed=3)
    for index in range(len(dataset)):
        scene = dataset.scene(index)
        for caption in (dataset.caption(index), data.canonical_caption(scene)):
            assert what_a_caption_says(parse_caption(caption)) == what_a_caption_says(scene)


def test_parsed_scene_has_canonical_sizes_and_unknown_positions():
    scene = parse_caption("a picture of a tiny white cross beneath a big green star")
    assert scene.relation == "below"
    assert [(o.size, o.colour, o.shape) for o in scene.objects] == [("small", "white", "cross"), ("large", "green", "star")]
    assert all(math.isnan(o.x) and math.isnan(o.y) for o in scene.objects)


def test_parser_ignores_case_spacing_and_a_final_full_stop():
    messy = parse_caption("  One BIG   white cross. ")
    assert messy is not None and what_a_caption_says(messy) == what_a_caption_says(parse_caption("one big white cross"))


@pytest.mark.parametrize(
    "caption",
    [
        "", "   ", ".", "a cat on a mat", "a red circle", "small red circle", "a small pink circle",
        "a huge red circle", "a small red hexagon", "two small red circles", "a small red circle and a big blue star",
        "a small red circle to the left of", "a small red circle left of a big blue star left of a small red star",
        "a small red circle next to a big blue star", "the small red circle", "a small red circle a small red circle",
        "a picture of a picture of a small red circle", "a small red circle!", "a small red circle to the left",
        "a big blue circle above below a small red square",
    ],
)
def test_captions_outside_the_grammar_are_unscorable(caption):
    assert parse_caption(caption) is None


def test_parser_refuses_what_is_not_a_string():
    with pytest.raises(TypeError, match="str"):
        parse_caption(None)


# ---- reading images --------------------------------------------------------------------


def test_relation_rule_agrees_with_how_the_data_places_pairs():
    rng = random.Random(1)
    for _ in range(2000):
        scene = data.random_scene(rng, "train")
        if scene.relation is not None:
            assert read_relation(*scene.objects) == scene.relation


def test_reader_finds_each_object_with_its_centre():
    dataset = ShapesDataset(60, 32, split="test", seed=5)
    for index in range(len(dataset)):
        scene, (image, _) = dataset.scene(index), dataset[index]
        found = read_image(image)
        assert len(found) == len(scene.objects)
        for truth in scene.objects:
            nearest = min(found, key=lambda o: (o.x - truth.x) ** 2 + (o.y - truth.y) ** 2)
            assert (nearest.colour, nearest.shape, nearest.size) == (truth.colour, truth.shape, truth.size)
            assert math.dist(nearest.centre, (truth.x, truth.y)) < 0.5 / 32  # within half a pixel


def test_empty_picture_has_no_objects_and_fails_every_caption():
    background = render()
    assert read_image(background) == []
    result = score(background, "a small red circle")
    assert result.count is False and result.full_match is False and result.objects[0].found is None


# ---- scoring ---------------------------------------------------------------------------


def test_clean_renders_of_every_split_fully_match_their_captions():
    scores = []
    for split in data.SPLITS:
        dataset = ShapesDataset(100, 32, split=split, seed=11)
        images, captions = zip(*(dataset[i] for i in range(len(dataset))))
        scores += score_batch(torch.stack(images), list(captions))
    summary = summarize(scores)
    assert summary["unscorable"] == 0 and summary["scored"] == 300
    assert summary["full_match_accuracy"] >= 0.99, summary


def test_clean_renders_at_64_pixels_match_too():
    dataset = ShapesDataset(20, 64, split="heldout", seed=2)
    summary = summarize([score(*dataset[i]) for i in range(len(dataset))])
    assert summary["full_match_accuracy"] >= 0.95, summary


BACKGROUND = torch.tensor(data.BACKGROUND).view(3, 1, 1) / 255


def test_blurred_renders_still_match():
    dataset = ShapesDataset(40, 32, split="test", seed=4)
    scores = []
    for index in range(len(dataset)):
        image, caption = dataset[index]
        blurred = (evaluate.blur(image - BACKGROUND, 1.0) + BACKGROUND).clamp(0, 1)  # softer than a decoder's output
        scores.append(score(blurred, caption))
    assert summarize(scores)["full_match_accuracy"] >= 0.97


def test_stray_specks_are_not_objects():
    image = render(ShapeObject("triangle", "green", "large", 0.6, 0.6))
    for y, x in ((2, 3), (2, 4), (29, 5), (10, 28)):  # a 2-pixel and two 1-pixel dots, as decoders leave
        image[:, y, x] = torch.tensor(data.COLOURS["white"]) / 255
    assert score(image, "a big green triangle").full_match


@pytest.mark.parametrize("rgb", [(140, 140, 140), (255, 150, 200)])  # grey is white half-mixed with the background
def test_a_colour_off_the_palette_is_no_colour(rgb):
    coverage = evaluate.draw_coverage("circle", "large", 16, 16, 32)
    image = BACKGROUND + coverage * (torch.tensor(rgb).view(3, 1, 1) / 255 - BACKGROUND)
    (found,) = read_image(image)
    assert found.colour is None
    assert score(image, "a big white circle").objects[0].colour is False


RED_CIRCLE = ShapeObject("circle", "red", "small", 0.2, 0.5)
BLUE_STAR = ShapeObject("star", "blue", "large", 0.65, 0.5)
CAPTION = "a small red circle to the left of a big blue star"


def judgements(result) -> dict:
    first, second = result.objects
    return {
        "colour": (first.colour, second.colour), "shape": (first.shape, second.shape),
        "size": (first.size, second.size), "relation": result.relation, "count": result.count,
    }


ALL_RIGHT = {"colour": (True, True), "shape": (True, True), "size": (True, True), "relation": True, "count": True}


def test_the_true_picture_is_a_full_match():
    result = score(render(RED_CIRCLE, BLUE_STAR), CAPTION)
    assert judgements(result) == ALL_RIGHT and result.full_match


@pytest.mark.parametrize(
    "change, wrong",
    [
        ({"colour": "green"}, {"colour": (False, True)}),
        ({"shape": "square"}, {"shape": (False, True)}),
        ({"shape": "triangle"}, {"shape": (False, True)}),
        ({"size": "large"}, {"size": (False, True)}),
        ({"x": 0.6, "y": 0.12}, {"relation": False}),  # now above the star, not left of it
    ],
)
def test_one_changed_attribute_is_exactly_one_miss(change, wrong):
    result = score(render(dataclasses.replace(RED_CIRCLE, **change), BLUE_STAR), CAPTION)
    assert judgements(result) == {**ALL_RIGHT, **wrong}
    assert result.full_match is False


def test_an_extra_object_fails_only_the_count():
    extra = ShapeObject("triangle", "yellow", "small", 0.2, 0.85)
    result = score(render(RED_CIRCLE, BLUE_STAR, extra), CAPTION)
    assert judgements(result) == {**ALL_RIGHT, "count": False}
    assert result.full_match is False and len(result.detected) == 3


def test_a_missing_object_fails_that_object_the_relation_and_the_count():
    result = score(render(RED_CIRCLE), CAPTION)
    assert result.objects[0].correct and result.objects[1].found is None and not result.objects[1].shape
    assert result.relation is False and result.count is False and result.full_match is False


def test_two_objects_melted_into_one_fail():
    melted = render(ShapeObject("circle", "red", "large", 0.45, 0.5), ShapeObject("square", "red", "large", 0.55, 0.5))
    result = score(melted, "a big red circle to the left of a big red square")
    assert result.full_match is False and result.count is False


@pytest.mark.parametrize(
    "first, second, relation",
    [
        # boxes 0.02 apart, the closest data._place_pair allows: the blobs touch
        (ShapeObject("cross", "white", "small", 0.3, 0.5), ShapeObject("cross", "white", "small", 0.56, 0.5), "left of"),
        (ShapeObject("square", "orange", "large", 0.5, 0.25), ShapeObject("circle", "yellow", "large", 0.5, 0.67), "above"),
        (ShapeObject("circle", "green", "large", 0.3, 0.4), ShapeObject("diamond", "green", "small", 0.64, 0.42), "left of"),
    ],
)
def test_touching_objects_are_told_apart(first, second, relation):
    scene = Scene((first, second), relation)
    result = score(render(first, second), data.canonical_caption(scene))
    assert result.full_match, result.detected


@pytest.mark.parametrize(
    "under, over, caption",
    [
        # data never overlaps objects, but a generator may: the colours still tell them apart
        (ShapeObject("square", "blue", "large", 0.5, 0.6), ShapeObject("circle", "yellow", "small", 0.5, 0.36),
         "a large blue square below a small yellow circle"),
        (ShapeObject("circle", "white", "large", 0.5, 0.5), ShapeObject("star", "red", "small", 0.3, 0.45),
         "a small red star left of a big white circle"),
    ],
)
def test_overlapping_objects_of_different_colours_are_told_apart(under, over, caption):
    result = score(render(under, over), caption)
    assert result.full_match, result.detected


def test_unscorable_captions_are_counted_not_scored():
    image = render(RED_CIRCLE, BLUE_STAR)
    scores = score_batch([image, image, image], [CAPTION, "a cat on a mat", "a small red circle"])
    assert scores[1].scorable is False and scores[1].full_match is None
    summary = summarize(scores)
    assert (summary["images"], summary["scored"], summary["unscorable"]) == (3, 2, 1)
    assert summary["full_match_accuracy"] == 0.5 and summary["count_accuracy"] == 0.5
    assert summary["relation_accuracy"] == 1.0 and summary["relations"] == 1
    assert summarize([])["full_match_accuracy"] is None


# ---- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 32, 48), (32, 32, 3), (1, 3, 32, 32), (4, 32, 32), (3, 32), (3, 8, 8)])
def test_images_of_the_wrong_shape_are_refused(shape):
    with pytest.raises(ValueError, match=r"expected"):
        read_image(torch.rand(shape))


@pytest.mark.parametrize("image", [torch.rand(3, 32, 32) * 255, torch.rand(3, 32, 32) - 0.5, torch.full((3, 32, 32), math.nan)])
def test_images_outside_zero_one_are_refused(image):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        score(image, CAPTION)


def test_integer_images_and_mismatched_batches_are_refused():
    with pytest.raises(ValueError, match="float"):
        read_image(torch.zeros(3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError):
        read_image([[0.0]])
    with pytest.raises(ValueError, match="one caption per image"):
        score_batch(torch.zeros(2, 3, 32, 32), [CAPTION])
    with pytest.raises(ValueError, match=r"\[B, 3, S, S\]"):
        score_batch(torch.zeros(3, 32, 32), [CAPTION] * 3)
