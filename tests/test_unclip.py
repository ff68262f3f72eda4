"""DALL·E 2's ideas at course size: retrieval, slerp, text-diff, centring, the decoder and the prior."""

import doctest
import math

import pytest
import torch
import torch.nn.functional as F

from dalle_lesson import checkpoint, data, evaluate, stages, unclip
from dalle_lesson.clip import embed, load_clip, scene_key
from dalle_lesson.dvae import load_dvae
from dalle_lesson.train import Recipe, fit
from dalle_lesson.unclip import (DecoderConfig, EmbeddingDecoder, EmbeddingPrior, PriorConfig, UnCLIP, centred,
                                 retrieve, slerp, text_diff)


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ---- the shared space -------------------------------------------------------------------


def test_the_examples_in_the_docstrings_hold():
    results = doctest.testmod(unclip)
    assert results.attempted >= 6 and results.failed == 0


def test_retrieve_matches_a_full_sort_of_the_cosines():
    queries, items = unit(7, 16), unit(50, 16, seed=1)
    similarities, indices = retrieve(queries, items, k=5)
    cosines = F.cosine_similarity(queries[:, None], items[None], dim=-1)  # [7, 50], computed another way
    expected = cosines.argsort(dim=1, descending=True)[:, :5]
    assert torch.equal(indices, expected)
    assert torch.allclose(similarities, cosines.gather(1, expected), atol=1e-6)
    assert retrieve(queries, items[:3], k=5)[1].shape == (7, 3)  # k larger than the items: all of them
    with pytest.raises(ValueError, match="same CLIP"):
        retrieve(queries, unit(5, 8))


def test_the_course_clip_finds_a_scene_from_its_caption_and_back():
    clip_model = load_clip()
    test = data.ShapesDataset(length=100, image_size=32, split="test")
    images = stages.preload_images(test, 100)
    captions = [test.caption(i) for i in range(100)]
    keys = [scene_key(test.scene(i)) for i in range(100)]
    image_vectors, text_vectors = embed(clip_model, images, captions)
    t2i = unclip.recall_at_k(retrieve(text_vectors, image_vectors, k=5)[1], keys, keys)
    i2t = unclip.recall_at_k(retrieve(image_vectors, text_vectors, k=5)[1], keys, keys)
    shuffled = keys[1:] + keys[:1]  # the same retrieval judged against the wrong scenes
    wrong = unclip.recall_at_k(retrieve(text_vectors, image_vectors, k=5)[1], keys, shuffled)
    # Measured: recall@5 caption -> picture 1.00, picture -> caption 1.00; against the wrong keys 0.05
    assert t2i > 0.9 and i2t > 0.9 and wrong < 0.25, (t2i, i2t, wrong)


def test_slerp_walks_the_great_circle_at_constant_speed():
    a, b = unit(4, 16), unit(4, 16, seed=1)
    angle = torch.acos((a * b).sum(-1))
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-5) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-5)
    for t in (0.25, 0.5, 0.8):
        point = slerp(a, b, t)
        assert torch.allclose(point.norm(dim=-1), torch.ones(4), atol=1e-5)
        assert torch.allclose(torch.acos((a * point).sum(-1).clamp(-1, 1)), t * angle, atol=1e-3)
        assert torch.allclose(torch.acos((point * b).sum(-1).clamp(-1, 1)), (1 - t) * angle, atol=1e-3)
    same = slerp(a, a, 0.5)  # equal vectors: no division by zero
    assert torch.isfinite(same).all() and torch.allclose(same, a, atol=1e-3)


def test_text_diff_turns_the_picture_toward_the_difference_of_the_captions():
    image, source, target = unit(3, 16), unit(3, 16, seed=1), unit(3, 16, seed=2)
    direction = F.normalize(target - source, dim=-1)
    assert torch.allclose(text_diff(image, source, target, 0.0), image, atol=1e-5)
    assert torch.allclose(text_diff(image, source, target, 1.0), direction, atol=1e-5)
    halfway = text_diff(image, source, target, 0.5)
    assert torch.allclose((halfway * image).sum(-1), (halfway * direction).sum(-1), atol=1e-4)


# ---- centring ---------------------------------------------------------------------------


def test_centring_is_a_translation_that_puts_the_objects_in_the_middle():
    generator = torch.Generator().manual_seed(0)
    pictures = torch.full((20, 3, 32, 32), 30, dtype=torch.uint8)
    for picture in pictures:
        top, left = torch.randint(0, 24, (2,), generator=generator).tolist()
        picture[:, top:top + 8, left:left + 5] = torch.randint(100, 255, (3, 8, 5), generator=generator, dtype=torch.uint8)
    result = centred(pictures)
    for before, after in zip(pictures, result):
        rows, columns = (after[0] != 30).nonzero().T
        assert abs((rows.min() + rows.max()) / 2 - 15.5) <= 0.5 and abs((columns.min() + columns.max()) / 2 - 15.5) <= 0.5
        r0, c0 = (before[0] != 30).nonzero().min(0).values.tolist()
        r1, c1 = (after[0] != 30).nonzero().min(0).values.tolist()
        assert torch.equal(after, torch.roll(before, (r1 - r0, c1 - c0), (1, 2)))  # nothing wrapped round
    empty = torch.full((1, 3, 8, 8), 30, dtype=torch.uint8)
    assert torch.equal(centred(empty), empty)
    with pytest.raises(ValueError, match="uint8"):
        centred(empty.float())


def test_centred_shapes_pictures_still_say_their_captions():
    dvae = load_dvae()
    dataset = data.ShapesDataset(length=60, image_size=32, split="train")
    images = stages.preload_images(dataset, 60)
    captions = [dataset.caption(i) for i in range(60)]
    moved = unclip.centred(images)
    with torch.no_grad():
        trip = dvae.decode(unclip.decoder_targets(dvae, images, progress=False))
    pixels_right = [s.full_match for s in evaluate.score_batch(moved.float() / 255, captions)]
    trip_right = [s.full_match for s in evaluate.score_batch(trip, captions)]
    # Measured on 300 training scenes: all 300 centred pictures and their dVAE round trips read fully right
    assert all(pixels_right) and all(trip_right), sum(trip_right)


# ---- the two models, trained by the one engine --------------------------------------------


def test_the_decoder_learns_code_grids_through_the_engine(one_thread):
    torch.manual_seed(0)
    vectors = unit(16, 8)
    codes = torch.randint(0, 10, (16, 8, 8))
    model = EmbeddingDecoder(DecoderConfig(embed_dim=8, grid_size=8, vocab_size=10, width=32))
    assert model(vectors).shape == (16, 10, 8, 8)
    stage = stages.unclip_decoder_stage(model, vectors, codes)
    log = fit(stage, Recipe(steps=150, batch_size=16, lr=1e-2, log_every=10, save_every=1000), progress=False)
    assert log[0]["cell_acc"] < 0.5 and log[-1]["cell_acc"] > 0.95, (log[0], log[-1])
    assert torch.equal(model.codes(vectors), codes)
    with pytest.raises(ValueError, match="8x8 grids"):
        stages.unclip_decoder_stage(model, vectors, codes[:, :4, :4])


def test_the_prior_learns_a_map_between_two_spheres(one_thread):
    torch.manual_seed(0)
    text = unit(512, 8)
    rotation = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(3)))[0]
    images = F.normalize(text @ rotation + 0.3, dim=-1)  # another region of the sphere, as CLIP's images are
    model = EmbeddingPrior(PriorConfig(embed_dim=8, width=32, layers=1))
    stage = stages.unclip_prior_stage(model, text[:400], images[:400], validation=(text[400:], images[400:]))
    log = fit(stage, Recipe(steps=300, batch_size=64, lr=3e-3, log_every=50, save_every=1000), progress=False)
    assert torch.allclose(model(text).norm(dim=-1), torch.ones(512), atol=1e-5)
    before = float((text[400:] * images[400:]).sum(-1).mean())
    assert log[-1]["val_cosine"] > 0.95 > before, (before, log[-1])


def test_decoder_and_prior_files_round_trip_and_refuse_each_other(tmp_path):
    decoder = EmbeddingDecoder(DecoderConfig(embed_dim=8, grid_size=4, vocab_size=6, width=8))
    prior = EmbeddingPrior(PriorConfig(embed_dim=8, width=16, layers=1))
    unclip.save_unclip(decoder, tmp_path / "decoder.safetensors")
    unclip.save_unclip(prior, tmp_path / "prior.safetensors")
    vectors = unit(3, 8)
    assert torch.equal(unclip.load_decoder(tmp_path / "decoder.safetensors")(vectors), decoder(vectors))
    assert torch.equal(unclip.load_prior(tmp_path / "prior.safetensors")(vectors), prior(vectors))
    with pytest.raises(ValueError, match="unCLIP decoder checkpoint; this wants a unCLIP prior"):
        unclip.load_prior(tmp_path / "decoder.safetensors")
    with pytest.raises(ValueError, match="power of two"):
        DecoderConfig(grid_size=12)


# ---- the shipped models ------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    return UnCLIP.load()


def test_the_shipped_decoder_and_prior_were_trained_on_the_shipped_clip_and_dvae(shipped):
    for name in (unclip.SHIPPED_DECODER, unclip.SHIPPED_PRIOR):
        meta = checkpoint.read_metadata(data.shipped_path(name))
        assert meta["clip"] == checkpoint.file_digest(data.shipped_path("clip_lesson.safetensors"))
    meta = checkpoint.read_metadata(data.shipped_path(unclip.SHIPPED_DECODER))
    assert meta["dvae"] == checkpoint.file_digest(data.shipped_path("dvae_lesson.safetensors"))
    images = shipped(["a red circle", "a small blue square above a big green star"])
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1


def test_a_decoder_trained_on_another_clip_is_refused(tmp_path, shipped):
    decoder_file = tmp_path / "decoder.safetensors"
    unclip.save_unclip(shipped.decoder, decoder_file, clip="000000000000", dvae="000000000000")
    with pytest.raises(ValueError, match="retrain it on this file"):
        UnCLIP.load(decoder=decoder_file)
    small = EmbeddingDecoder(DecoderConfig(embed_dim=16))
    with pytest.raises(ValueError, match="train the decoder on this CLIP"):
        UnCLIP(shipped.clip, None, small, shipped.dvae)
    with pytest.raises(ValueError, match="has no prior"):
        UnCLIP(shipped.clip, None, shipped.decoder, shipped.dvae)(["a red circle"])


def test_the_shipped_decoder_draws_back_what_the_vector_of_a_test_picture_says(shipped):
    test = data.ShapesDataset(length=100, image_size=32, split="test")
    images = stages.preload_images(test, 100)
    captions = [test.caption(i) for i in range(100)]
    image_vectors, text_vectors = embed(shipped.clip, images, captions)
    through_image = unclip.decoder_accuracy(shipped.decoder, shipped.dvae, image_vectors, captions)
    through_prior = unclip.decoder_accuracy(shipped.decoder, shipped.dvae, shipped.prior(text_vectors), captions)
    shuffled = unclip.decoder_accuracy(shipped.decoder, shipped.dvae, image_vectors.roll(1, 0), captions)
    # Measured (100 test pictures): full match through the picture's vector 0.47, through the prior
    # from the caption 0.49, the caption's own vector 0.44; another picture's vector 0.01
    assert through_image["full_match"] > 0.4 and shuffled["full_match"] < 0.1, (through_image, shuffled)
    assert through_prior["full_match"] > 0.4, through_prior


def test_cli_trains_a_decoder_and_a_prior_for_two_steps(tmp_path, one_thread, capsys):
    from dalle_lesson.cli import main

    for stage in ("decoder", "prior"):
        out = tmp_path / f"{stage}.safetensors"
        main(["train", stage, "--steps", "2", "--batch-size", "4", "--train-images", "8", "--val-images", "4",
              "--width", "8", "--threads", "1", "--out", str(out)])
        assert "saved" in capsys.readouterr().out
        meta = checkpoint.read_metadata(out)
        assert meta["kind"] == f"unclip_{stage}" and meta["step"] == 2
        assert meta["clip"] == checkpoint.file_digest(data.shipped_path("clip_lesson.safetensors"))
    assert unclip.load_decoder(tmp_path / "decoder.safetensors").config.grid_size == 16
    assert math.isfinite(checkpoint.read_metadata(tmp_path / "prior.safetensors")["log"][-1]["val_cosine"])


def test_cli_trains_a_decoder_on_a_folder_of_captioned_pictures(tmp_path, one_thread, capsys):
    from PIL import Image

    from dalle_lesson.cli import main

    folder = tmp_path / "pictures"
    folder.mkdir()
    shapes = data.ShapesDataset(length=4, image_size=32, split="train")
    for i in range(4):
        image, caption = shapes[i]
        Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    out = tmp_path / "decoder.safetensors"
    main(["train", "decoder", "--dataset", "folder", "--folder", str(folder), "--steps", "1", "--batch-size", "2",
          "--width", "8", "--no-centre", "--threads", "1", "--out", str(out)])
    assert "4 training examples" in capsys.readouterr().out
    meta = checkpoint.read_metadata(out)
    assert meta["centred"] is False and meta["data"] == "folder-train-4-32"
