"""Tests of dalle_lesson.clip: the course CLIP, its loss, files, reranking and the CLIP stage."""

import ast
import random
import socket
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from dalle_lesson import checkpoint, clip, data, stages
from dalle_lesson.train import Recipe, fit

TINY = dict(image_size=16, patch_size=8, vision_width=32, vision_layers=1, vision_head_width=16, embed_dim=16,
            text_width=32, text_layers=1, text_heads=2)


@pytest.fixture
def model(one_thread):
    torch.manual_seed(0)
    return clip.CourseCLIP(clip.CLIPConfig(**TINY)).eval()


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("tried to use the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def images(n, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


CAPTIONS = ["a red circle", "a big blue square", "a tiny green star above a white cross", "grinning face"]


# ---- the module's place in the package ------------------------------------------------------


def test_clip_imports_neither_the_engine_nor_the_cli():
    tree = ast.parse(Path(clip.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "dalle_lesson":
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dalle_lesson."):
            imported.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            imported |= {a.name.split(".")[1] for a in node.names if a.name.startswith("dalle_lesson.")}
    assert imported and not imported & {"train", "stages", "cli", "pipeline"}, imported


# ---- text: tokens and end-token pooling -------------------------------------------------------


def test_tokenize_adds_start_and_end_and_pads_with_zeros(model):
    c = model.config
    tokens = model.tokenize(["a red circle"])
    ids = model.tokenizer.encode("a red circle")
    assert tokens.shape == (1, c.context_length)
    assert tokens[0, : len(ids) + 2].tolist() == [c.start_id, *ids, c.end_id]
    assert (tokens[0, len(ids) + 2:] == 0).all()
    assert tokens.argmax(1).item() == len(ids) + 1  # argmax pooling finds the end token
    assert c.vocab_size == model.tokenizer.vocab_size + 2


def test_long_captions_are_cut_with_a_warning_and_keep_their_end_token(model):
    with pytest.warns(UserWarning, match="1 of 2 captions"):
        tokens = model.tokenize(["a red circle " * 20, "a red circle"])
    assert tokens[0, -1].item() == model.config.end_id
    with pytest.raises(TypeError):
        model.tokenize("a red circle")


def test_text_embedding_is_read_at_the_end_token(model):
    tokens = model.tokenize(CAPTIONS)
    ends = tokens.argmax(1)
    noisy = tokens.clone()
    after = torch.arange(tokens.shape[1]) > ends[:, None]  # the padding after each end token
    noisy[after] = torch.randint(0, model.config.start_id, (int(after.sum()),))
    assert torch.allclose(model.encode_text(tokens), model.encode_text(noisy), atol=1e-6)
    changed = tokens.clone()
    changed[:, 1] = (changed[:, 1] + 1) % model.config.start_id  # a real token before the end
    assert not torch.allclose(model.encode_text(tokens), model.encode_text(changed), atol=1e-3)


# ---- the loss --------------------------------------------------------------------------------


def test_clip_loss_is_the_symmetric_cross_entropy(model):
    model.clip.logit_scale.data.fill_(1.7)
    x = images(4)
    out = model.training_loss(x, CAPTIONS)
    logits = torch.exp(torch.tensor(1.7)) * model.encode_images(x) @ model.encode_text(CAPTIONS).T
    target = torch.arange(4)
    by_hand = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    assert torch.allclose(out["loss"], by_hand, atol=1e-5)
    assert out["acc_i2t"].item() == (logits.argmax(1) == target).float().mean().item()
    assert out["dup_captions"].item() == 0
    assert model.training_loss(x, CAPTIONS[:2] * 2)["dup_captions"].item() == 1.0  # every caption twice


def test_logit_scale_is_capped_at_100(model):
    model.clip.logit_scale.data.fill_(10.0)
    assert model.logit_scale().item() == pytest.approx(100.0)


def test_similarity_is_a_table_of_cosines(model):
    table = model.similarity(images(3), CAPTIONS)
    assert table.shape == (3, 4) and table.abs().max() <= 1 + 1e-5


def test_encode_images_refuses_wrong_sizes_and_ranges(model):
    with pytest.raises(ValueError, match="16x16"):
        model.encode_images(images(2, size=32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.encode_images(images(2) * 255)
    with pytest.raises(ValueError, match="floats"):
        model.encode_images((images(2) * 255).to(torch.uint8))


# ---- files -----------------------------------------------------------------------------------


def test_checkpoint_round_trip(model, tmp_path):
    path = clip.save_clip(model, tmp_path / "clip.safetensors", step=7)
    assert checkpoint.read_metadata(path)["kind"] == "clip"
    loaded = clip.load_clip(path)
    assert loaded.config == model.config
    assert torch.equal(loaded.similarity(images(2), CAPTIONS), model.similarity(images(2), CAPTIONS))
    half = clip.load_clip(clip.save_clip(model, tmp_path / "half.safetensors", dtype=torch.float16))
    assert torch.allclose(half.similarity(images(2), CAPTIONS), model.similarity(images(2), CAPTIONS), atol=2e-2)


def test_loading_another_kind_as_clip_fails_in_one_line(tmp_path):
    from dalle_lesson.vae import VAE, VAEConfig

    path = checkpoint.save(VAE(VAEConfig()), tmp_path / "vae.safetensors")
    with pytest.raises(ValueError, match="VAE checkpoint; this wants a CLIP one"):
        clip.load_clip(path)


def test_open_clip_weights_from_a_local_file(tmp_path, one_thread, no_network):
    name = clip.register_with_open_clip("dalle-lesson-test-tiny", clip.CLIPConfig(**TINY))
    torch.manual_seed(1)
    original = open_clip.create_model(name, pretrained=None).eval()
    assert isinstance(original, open_clip.CLIP)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, tmp_path / "w.safetensors")
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in original.state_dict().items()}},
               tmp_path / "w.pt")  # the way open_clip's own training (under DDP) saves
    x, text = torch.randn(2, 3, 16, 16), torch.randint(0, 1000, (2, 24))
    for file in ("w.safetensors", "w.pt"):
        loaded = clip.load_open_clip_weights(name, tmp_path / file)
        assert loaded is not original
        assert torch.equal(loaded.encode_image(x), original.encode_image(x))
        assert torch.equal(loaded.encode_text(text), original.encode_text(text))
    with pytest.raises(ValueError, match="does not fit"):
        clip.load_open_clip_weights(clip.CLIPConfig(**{**TINY, "embed_dim": 8}), tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError):
        clip.load_open_clip_weights(name, tmp_path / "missing.pt")
    hugging_face_text = {**clip.CLIPConfig(**TINY).open_clip_config(), "text_cfg": {"hf_model_name": "some/model"}}
    with pytest.raises(ValueError, match="needs a download"):
        clip.load_open_clip_weights(hugging_face_text, tmp_path / "w.pt")
    with pytest.raises(ValueError, match="knows no model"):
        clip.load_open_clip_weights("no-such-architecture", tmp_path / "w.pt")


def test_open_clip_loads_a_course_checkpoint(model, tmp_path, no_network):
    path = clip.save_clip(model, tmp_path / "clip.safetensors")
    loaded = clip.load_open_clip_weights(model.config, path)  # a CLIPConfig names the architecture
    x = (images(2) - model.mean) / model.std
    assert torch.equal(loaded.encode_image(x), model.clip.encode_image(x))


def test_a_pickled_module_is_not_run(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a pickle of a class, not a state dict
    with pytest.raises(ValueError, match="weights_only"):
        clip.load_open_clip_weights(clip.CLIPConfig(**TINY), tmp_path / "module.pt")


# ---- rerank and zero-shot --------------------------------------------------------------------


def test_rerank_sorts_by_score_best_first(model):
    x = images(6)
    ranked, scores = clip.rerank(model, x, "a red circle")
    expected = model.similarity(x, ["a red circle"])[:, 0]
    assert torch.allclose(clip.clip_scores(model, x, "a red circle"), expected, atol=1e-6)  # in input order
    order = torch.argsort(expected, descending=True)
    assert torch.allclose(scores, expected[order], atol=1e-6)
    assert torch.equal(ranked, x[order])
    assert (scores[:-1] >= scores[1:]).all()


def test_rerank_with_one_caption_per_image(model):
    x = images(4)
    ranked, scores = clip.rerank(model, list(x), CAPTIONS)  # a list of images works too
    own = model.similarity(x, CAPTIONS).diagonal()
    assert torch.allclose(scores, own.sort(descending=True).values, atol=1e-6)
    with pytest.raises(ValueError, match="one caption for all 4 images or one per image"):
        clip.rerank(model, x, CAPTIONS[:2])


def test_rerank_of_nothing_is_nothing(model):
    for empty in ([], torch.empty(0, 3, 16, 16)):
        ranked, scores = clip.rerank(model, empty, "a red circle")
        assert len(ranked) == 0 and len(scores) == 0


def test_rerank_resizes_square_images_and_refuses_the_rest(model):
    x = images(3)
    big = F.interpolate(x, size=(32, 32), mode="nearest")
    with pytest.warns(UserWarning, match="resizing 32x32"):
        ranked, scores = clip.rerank(model, big, "a red circle")
    assert ranked.shape == big.shape  # the caller's own images come back, sorted
    _, small_scores = clip.rerank(model, x, "a red circle")
    assert torch.allclose(scores, small_scores, atol=0.05)
    with pytest.raises(ValueError, match="square"):
        clip.rerank(model, torch.rand(2, 3, 16, 20), "a red circle")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        clip.rerank(model, x * 255, "a red circle")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        clip.rerank(model, x - 0.5, "a red circle")
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        clip.rerank(model, torch.rand(2, 1, 16, 16), "a red circle")


def test_zero_shot_classify_picks_the_most_similar_class(model):
    x = images(5)
    prompts = ["a red circle", "a blue square", "a green star"]
    assert torch.equal(clip.zero_shot_classify(model, x, prompts), model.similarity(x, prompts).argmax(1))
    ensembles = [["a red circle", "a red star"], ["a blue circle", "a blue star"]]
    mean = F.normalize(model.encode_text(sum(ensembles, [])).view(2, 2, -1).sum(1), dim=-1)
    assert torch.equal(clip.zero_shot_classify(model, x, ensembles), (model.encode_images(x) @ mean.T).argmax(1))


def test_zero_shot_accuracy_reads_held_out_one_object_scenes(model, monkeypatch):
    result = clip.zero_shot_accuracy(model, count=8, split="heldout")
    assert result["images"] == 8 and 0 <= result["colour_acc"] <= 1 and 0 <= result["shape_acc"] <= 1
    _, scenes = clip.one_object_scenes(8, 16, "heldout")
    assert all((s.objects[0].shape, s.objects[0].colour) in data.HELD_OUT_PAIRS for s in scenes)
    prompts, kinds = clip.one_object_prompts()
    assert len(prompts) == 96 and prompts[0] == "a small red circle"
    truth = [(s.objects[0].shape, s.objects[0].colour, s.objects[0].size) for s in scenes]
    other = {colour: next(c for c in data.COLOURS if c != colour) for colour in data.COLOURS}
    wrong_colour = [(shape, other[colour], size) for shape, colour, size in truth]
    for answers, expected in ((truth, (1.0, 1.0)), (wrong_colour, (0.0, 1.0))):  # a classifier that knows
        monkeypatch.setattr(clip, "zero_shot_classify", lambda *_: torch.tensor([kinds.index(a) for a in answers]))
        result = clip.zero_shot_accuracy(model, count=8, split="heldout")
        assert (result["colour_acc"], result["shape_acc"]) == expected


# ---- hard negatives and batches without false negatives --------------------------------------


def differences(a: data.Scene, b: data.Scene) -> set[str]:
    found = {"relation"} if a.relation != b.relation else set()
    for x, y in zip(a.objects, b.objects):
        found |= {name for name in ("colour", "shape", "size") if getattr(x, name) != getattr(y, name)}
    return found


def test_swap_attribute_changes_exactly_one_attribute():
    rng = random.Random(0)
    dataset = data.ShapesDataset(length=300, split="train")
    made = dict.fromkeys(clip.ATTRIBUTES, 0)
    for i in range(300):
        scene = dataset.scene(i)
        for attribute in clip.ATTRIBUTES:
            variant = clip.swap_attribute(scene, attribute, rng, "train")
            if variant is None:
                continue
            made[attribute] += 1
            assert differences(scene, variant) == {attribute}
            assert clip.scene_key(variant) != clip.scene_key(scene)
            assert not {(o.shape, o.colour) for o in variant.objects} & data.HELD_OUT_PAIRS
            if attribute == "relation":  # the same objects, on the other sides
                assert variant.relation == data.INVERSE_RELATION[scene.relation]
    assert min(made.values()) > 50, made


def test_scene_key_ignores_position_and_wording():
    a = data.Scene((data.ShapeObject("circle", "red", "small", 0.3, 0.3),))
    b = data.Scene((data.ShapeObject("circle", "red", "small", 0.7, 0.6),))
    c = data.Scene((data.ShapeObject("circle", "red", "large", 0.5, 0.5),))
    assert clip.scene_key(a) == clip.scene_key(b) != clip.scene_key(c)
    x, y = data.ShapeObject("star", "blue", "small", 0.2, 0.5), data.ShapeObject("cross", "white", "large", 0.7, 0.5)
    assert clip.scene_key(data.Scene((x, y), "left of")) == clip.scene_key(data.Scene((y, x), "right of"))


def test_hard_negative_pairs_are_scene_then_twin():
    pairs = clip.hard_negative_pairs(20, image_size=16, split="test")
    assert pairs.images.shape == (40, 3, 16, 16) and pairs.images.dtype == torch.uint8
    assert len(pairs.attributes) == 20
    assert all(pairs.keys[2 * k] != pairs.keys[2 * k + 1] for k in range(20))
    assert not torch.equal(pairs.images[0], pairs.images[1])
    again = clip.hard_negative_pairs(20, image_size=16, split="test")
    assert again.captions == pairs.captions and torch.equal(again.images, pairs.images)


def test_distinct_batch_never_repeats_a_meaning():
    groups = torch.tensor([k % 5 for k in range(40)])  # only 5 meanings among 40 examples
    indices = torch.tensor([0, 5, 10, 1, 2])
    batch = clip.distinct_batch(indices, groups)
    assert len(batch) == 5 and len(set(groups[batch].tolist())) == 5
    assert torch.equal(batch, clip.distinct_batch(indices, groups))  # a function of the indices alone
    pairs = clip.distinct_batch(torch.tensor([0, 2, 4, 6]), torch.arange(40) // 3, unit=2)
    assert (pairs[0::2] % 2 == 0).all() and torch.equal(pairs[1::2], pairs[0::2] + 1)  # twins stay together
    assert len(set((torch.arange(40) // 3)[pairs].tolist())) == 4


def test_evaluate_clip_reports_loss_retrieval_and_pairs(model):
    pairs = clip.hard_negative_pairs(8, image_size=16, split="test")
    result = clip.evaluate_clip(model, pairs.images, pairs.captions, pairs.keys, pairs=True,
                                attributes=pairs.attributes)
    kinds = {f"pair_acc_{a}" for a in pairs.attributes}
    assert set(result) == {"loss", "i2t_acc", "t2i_acc", "pair_acc"} | kinds
    assert all(0 <= result[k] <= 1 for k in ("i2t_acc", "t2i_acc", "pair_acc", *kinds))
    # the same numbers by hand: a caption against its own image and against its twin's
    image_features, text_features = clip.embed(model, pairs.images, pairs.captions)
    own = (image_features * text_features).sum(-1)
    twin = (image_features[torch.arange(16) ^ 1] * text_features).sum(-1)
    assert result["pair_acc"] == pytest.approx((own > twin).float().mean().item())
    similarity = image_features @ text_features.T
    meaning = torch.tensor([sorted(set(pairs.keys)).index(k) for k in pairs.keys])
    assert result["i2t_acc"] == pytest.approx((meaning[similarity.argmax(1)] == meaning).float().mean().item())


# ---- training through the engine and the CLI --------------------------------------------------


def test_a_short_run_through_the_engine_lowers_the_loss(model):
    pairs = clip.hard_negative_pairs(8, image_size=16, split="train", seed=1)  # 16 examples, 16 meanings
    assert len(set(pairs.keys)) == 16  # so every batch holds them all, none twice
    stage = stages.clip_stage(model, pairs.images, pairs.captions, keys=pairs.keys, pairs=True,
                              validation=clip.hard_negative_pairs(8, image_size=16, split="test"))
    log = fit(stage, Recipe(steps=60, batch_size=16, lr=5e-3, warmup_steps=10, log_every=5, save_every=100),
              device="cpu", progress=False)
    first, last = log[0]["loss"], sum(row["loss"] for row in log[-2:]) / 2
    assert last < first - 1.0, (first, last)  # from about ln 16 = 2.8 to about 0.9
    assert log[-1]["dup_captions"] == 0.0 and "val_pair_acc" in log[-1]
    assert stages.RECIPES["clip"].steps > 0


def test_cli_train_clip_runs_two_steps(tmp_path, one_thread, capsys):
    from dalle_lesson.cli import main

    out = tmp_path / "clip.safetensors"
    main(["train", "clip", "--steps", "2", "--batch-size", "4", "--train-images", "8", "--val-images", "4",
          "--image-size", "16", "--patch-size", "8", "--vision-width", "32", "--vision-layers", "1",
          "--text-width", "32", "--text-layers", "1", "--embed-dim", "16", "--threads", "1", "--fp16",
          "--out", str(out)])
    assert "saved" in capsys.readouterr().out
    meta = checkpoint.read_metadata(out)
    assert meta["kind"] == "clip" and meta["step"] == 2 and meta["pairs"] is True
    assert clip.load_clip(out).config.vision_width == 32
    assert out.with_suffix(".csv").is_file()
    with pytest.raises(SystemExit, match="--emoji mixes"):
        main(["train", "clip", "--dataset", "emoji", "--emoji", "--out", str(tmp_path / "x.safetensors")])
