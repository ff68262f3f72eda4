"""Tests of the end-to-end pipeline and `dalle-lesson generate`.

The checkpoints are random models written to temporary files by the tests themselves, so
the real loaders (load_dalle, load_dvae, the course tokenizer) are what is under test.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image

from dalle_lesson.bpe import load_course_tokenizer
from dalle_lesson.cli import main
from dalle_lesson.dalle import DALLE, DALLEConfig, save_dalle
from dalle_lesson.dvae import DiscreteVAE, DVAEConfig, save_dvae
from dalle_lesson.pipeline import Pipeline, sample_figure, sampling_panel
from dalle_lesson.sampling import generate, sampling_memory_bytes


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A small random DALL·E (course text vocabulary, 8x8 codes of 512) and a random lesson dVAE."""
    folder = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    tokenizer = load_course_tokenizer()
    config = DALLEConfig.tiny(d_model=64, n_layers=2, n_heads=4, text_vocab_size=tokenizer.vocab_size)
    model = DALLE(config)
    with torch.no_grad():  # sharper than the default init, so different captions give different codes
        model.head.weight.normal_(0, 0.5)
    save_dalle(model, folder / "dalle.safetensors")
    save_dvae(DiscreteVAE(DVAEConfig.lesson()), folder / "dvae.safetensors")
    return folder / "dalle.safetensors", folder / "dvae.safetensors"


@pytest.fixture(scope="module")
def pipeline(checkpoints):
    return Pipeline.load(model_path=checkpoints[0], dvae_path=checkpoints[1])


def test_pipeline_makes_images_from_its_codes(pipeline):
    result = pipeline("a small red circle", num_images=3, seed=0, temperature=0.9)
    assert result.images.shape == (3, 3, 32, 32)
    assert result.codes.shape == (3, 8, 8)
    assert 0 <= result.images.min() and result.images.max() <= 1
    assert result.captions == ["a small red circle"] * 3
    # The same steps by hand: tokenize, sample with the same seed, decode.
    text_ids = pipeline.tokenize(["a small red circle"]).repeat(3, 1)
    codes = generate(pipeline.model, text_ids, seed=0, temperature=0.9)
    assert torch.equal(result.codes, codes)
    assert torch.equal(result.images, pipeline.dvae.decode(codes))


def test_several_captions_each_get_num_images(pipeline):
    result = pipeline(["a blue square", "a green star"], num_images=2, seed=1, top_k=50)
    assert result.captions == ["a blue square", "a blue square", "a green star", "a green star"]
    assert result.codes.shape == (4, 8, 8)
    assert not torch.equal(result.codes[0], result.codes[2])


def test_empty_caption_samples_from_all_padding(pipeline):
    assert torch.equal(pipeline.tokenize([""])[0], 1024 + torch.arange(32))
    result = pipeline("", num_images=2, seed=0)
    assert result.images.shape == (2, 3, 32, 32)


def test_too_long_caption_is_truncated_with_a_warning(pipeline):
    long_caption = " ".join(["a big red circle above a small blue square"] * 8)
    with pytest.warns(UserWarning, match="truncated"):
        result = pipeline(long_caption, num_images=1, seed=0)
    # the same codes as for its first 32 tokens
    first_tokens = pipeline.tokenizer.encode(long_caption)[:32]
    assert len(pipeline.tokenizer.encode(long_caption)) > 32
    text_ids = torch.tensor([first_tokens])
    assert torch.equal(result.codes, generate(pipeline.model, text_ids, seed=0))


def test_bad_requests_are_refused(pipeline):
    with pytest.raises(ValueError, match="num_images must be a whole number >= 1"):
        pipeline("a red circle", num_images=0)
    with pytest.raises(ValueError, match="at least one caption"):
        pipeline([], num_images=1)
    with pytest.raises(ValueError, match="top_k must be"):
        pipeline("a red circle", num_images=1, top_k=0)


def test_mismatched_parts_are_refused(checkpoints, tmp_path):
    tokenizer = load_course_tokenizer()
    wrong = DALLE(DALLEConfig.tiny(d_model=32, n_layers=1, n_heads=2, image_vocab_size=256))
    with pytest.raises(ValueError, match="load the dVAE whose codes it was trained on"):
        Pipeline(tokenizer, wrong, DiscreteVAE(DVAEConfig.lesson()))
    wrong_text = DALLE(DALLEConfig.tiny(d_model=32, n_layers=1, n_heads=2, text_vocab_size=500))
    with pytest.raises(ValueError, match="text_vocab_size=500"):
        Pipeline(tokenizer, wrong_text, DiscreteVAE(DVAEConfig.lesson()))


def test_generate_command_writes_a_grid(checkpoints, tmp_path, capsys):
    out = tmp_path / "grid.png"
    main(["generate", "a small red circle above a big blue square", "--num-images", "4", "--out", str(out),
          "--model", str(checkpoints[0]), "--dvae", str(checkpoints[1]),
          "--temperature", "0.9", "--top-k", "100", "--top-p", "0.95", "--guidance", "2", "--seed", "3"])
    assert "wrote 4 images" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_generate_samples_with_the_measured_defaults_and_none_switches_them_off(checkpoints, tmp_path, monkeypatch):
    """The CLI's defaults are SAMPLING_DEFAULTS, the winner that benchmarks/sampling_settings.py recorded."""
    import json
    from pathlib import Path

    from dalle_lesson import pipeline as pipeline_module

    recorded = Path(__file__).parent.parent / "benchmarks" / "results" / "sampling_settings.json"
    assert json.loads(recorded.read_text())["best"] == pipeline_module.SAMPLING_DEFAULTS
    seen = []
    original = pipeline_module.Pipeline.__call__
    monkeypatch.setattr(pipeline_module.Pipeline, "__call__",
                        lambda self, *a, **k: seen.append(k) or original(self, *a, **k))
    common = ["--num-images", "1", "--model", str(checkpoints[0]), "--dvae", str(checkpoints[1])]
    main(["generate", "a red circle", "--out", str(tmp_path / "a.png"), *common])
    main(["generate", "a red circle", "--out", str(tmp_path / "b.png"), "--guidance", "none", "--top-k", "0", *common])
    defaults = pipeline_module.SAMPLING_DEFAULTS
    assert {key: seen[0][key] for key in defaults} == defaults
    assert seen[1]["guidance_scale"] is None and seen[1]["top_k"] is None
    assert seen[1]["temperature"] == defaults["temperature"]


def test_generate_command_explains_bad_settings(checkpoints, tmp_path):
    common = ["--model", str(checkpoints[0]), "--dvae", str(checkpoints[1]), "--out", str(tmp_path / "x.png")]
    with pytest.raises(SystemExit, match=r"top_p must lie in \(0, 1\]"):
        main(["generate", "a red circle", "--top-p", "1.5", *common])
    with pytest.raises(SystemExit, match="temperature must be a number > 0"):
        main(["generate", "a red circle", "--temperature", "0", *common])
    with pytest.raises(SystemExit, match="no DALL·E checkpoint"):
        main(["generate", "a red circle", "--model", str(tmp_path / "missing.safetensors")])


def test_generate_checks_its_output_before_sampling(checkpoints, tmp_path, monkeypatch, capsys):
    from dalle_lesson import pipeline as pipeline_module

    common = ["--model", str(checkpoints[0]), "--dvae", str(checkpoints[1]), "--num-images", "1"]
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setattr(pipeline_module, "generate", lambda *a, **k: pytest.fail("sampled before checking --out"))
    with pytest.raises(SystemExit, match="cannot write in"):
        main(["generate", "a red circle", *common, "--out", str(tmp_path / "a_file" / "grid.png")])
    with pytest.raises(SystemExit, match="is a directory"):
        main(["generate", "a red circle", *common, "--out", str(tmp_path)])
    monkeypatch.undo()
    main(["generate", "a red circle", *common, "--out", str(tmp_path / "new" / "folder" / "grid")])
    assert "writing " in capsys.readouterr().out and (tmp_path / "new" / "folder" / "grid.png").is_file()


def test_a_request_that_cannot_fit_in_memory_is_refused_at_once(pipeline, monkeypatch):
    from dalle_lesson import sampling

    monkeypatch.setattr(sampling, "available_memory_bytes", lambda device: 2**30)  # 1 GiB free
    needed = sampling.sampling_memory_bytes(pipeline.model.config, 100_000, guided=True)
    assert needed > 2**30
    with pytest.raises(ValueError, match=r"drawing 100000 images at once needs about .* GiB, but only 1.0 GiB"):
        pipeline("a red circle", num_images=100_000, guidance_scale=3.0)
    assert len(pipeline("a red circle", num_images=2, seed=0).images) == 2  # small requests still work


def test_the_memory_estimate_is_not_below_the_cache_it_allocates(pipeline):
    config = pipeline.model.config
    cache = pipeline.model.new_cache(4)
    cache_bytes = sum(t.numel() * t.element_size() for t in (cache.keys, cache.values))
    assert cache_bytes <= sampling_memory_bytes(config, 4) <= 10 * cache_bytes + 10 * 2**20


def test_loaders_default_to_the_shipped_files():
    """Until the shipped checkpoints exist this is skipped; afterwards it runs the real thing."""
    from dalle_lesson.data import shipped_path

    try:
        shipped_path("dalle_tiny.safetensors"), shipped_path("dvae_lesson.safetensors")
    except FileNotFoundError:
        pytest.skip("the shipped checkpoints are not in data/ yet")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = Pipeline.load()("a red circle", num_images=2, seed=0)
    assert result.images.shape == (2, 3, 32, 32)


def test_sample_figure_draws_the_asked_images(pipeline):
    import matplotlib.pyplot as plt

    figure = sample_figure(pipeline, "a green star", temperature=0.8, top_k=20, num_images=5, seed=2)
    drawn = [ax for ax in figure.axes if ax.images]
    assert len(drawn) == 5
    expected = pipeline("a green star", num_images=5, temperature=0.8, top_k=20, seed=2).images
    torch.testing.assert_close(torch.from_numpy(drawn[0].images[0].get_array().data).permute(2, 0, 1).float(),
                               expected[0].clamp(0, 1))
    plt.close(figure)


def test_sampling_panel_button_calls_the_function(pipeline, monkeypatch):
    """The button passes the widgets' values to sample_figure (the function tested above)."""
    import dalle_lesson.pipeline as module

    calls = []
    real = module.sample_figure
    monkeypatch.setattr(module, "sample_figure", lambda *args: calls.append(args) or real(*args))
    panel = sampling_panel(pipeline, caption="a red circle")
    caption_box, (temperature, top_k), (count, seed, button), output = (
        panel.children[0], panel.children[1].children, panel.children[2].children, panel.children[3])
    count.value, top_k.value, temperature.value, seed.value = 3, 10, 0.5, 4
    button.click()
    assert calls == [(pipeline, "a red circle", 0.5, 10, 3, 4)]
    caption_box.value, top_k.value = "", 0
    button.click()  # the empty caption and "all codes" work too
    assert calls[-1] == (pipeline, "", 0.5, 0, 3, 4)


# ---- candidates, reranked by CLIP ------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    from dalle_lesson.clip import CLIPConfig, CourseCLIP, save_clip

    torch.manual_seed(0)
    config = CLIPConfig.lesson(vision_width=32, vision_layers=1, text_width=32, text_layers=1, text_heads=1,
                               embed_dim=16)
    return save_clip(CourseCLIP(config), tmp_path_factory.mktemp("clip") / "clip.safetensors")


def test_candidates_keep_clips_favourites_best_first(checkpoints, clip_path):
    from dalle_lesson.clip import clip_scores, load_clip

    pipeline = Pipeline.load(model_path=checkpoints[0], dvae_path=checkpoints[1], clip_path=clip_path)
    everything = pipeline(["a red circle", "a big blue star"], num_images=6, seed=4)  # 6 candidates each
    best = pipeline(["a red circle", "a big blue star"], num_images=2, candidates=6, seed=4)
    assert best.images.shape == (4, 3, 32, 32) and best.captions == ["a red circle"] * 2 + ["a big blue star"] * 2
    clip = load_clip(clip_path)
    for i, caption in enumerate(["a red circle", "a big blue star"]):  # an independent recomputation
        scores = clip_scores(clip, everything.images[6 * i: 6 * i + 6], caption)
        top = scores.argsort(descending=True)[:2]
        assert torch.equal(best.images[2 * i: 2 * i + 2], everything.images[6 * i + top])
        assert torch.equal(best.codes[2 * i: 2 * i + 2], everything.codes[6 * i + top])
        torch.testing.assert_close(best.scores[2 * i: 2 * i + 2], scores[top])
    assert best.scores[0] >= best.scores[1] and best.scores[2] >= best.scores[3]


def test_candidates_must_cover_the_images_kept(pipeline):
    with pytest.raises(ValueError, match="candidates must be a whole number >= num_images"):
        pipeline("a red circle", num_images=4, candidates=2)


def test_generate_command_reranks_candidates(checkpoints, clip_path, tmp_path, capsys):
    out = tmp_path / "best.png"
    main(["generate", "a red circle", "--num-images", "2", "--candidates", "4", "--out", str(out),
          "--model", str(checkpoints[0]), "--dvae", str(checkpoints[1]), "--clip", str(clip_path)])
    assert "CLIP's best of 4" in capsys.readouterr().out and out.is_file()
