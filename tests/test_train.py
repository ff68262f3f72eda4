"""DALL·E training: optimiser recipe, the loss falls, NaN stop, code cache, the CLI."""

import csv

import pytest
import torch
import torch.nn as nn

from dalle_lesson.dalle import DALLE, DALLEConfig, load_dalle
from dalle_lesson.train import TrainSettings, cached_codes, learning_rate, parameter_groups, train_dalle


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def small_config(**overrides) -> DALLEConfig:
    values = dict(d_model=32, n_layers=2, n_heads=2, text_seq_len=4, text_vocab_size=8, image_size=4,
                  image_vocab_size=6, conv_kernel=3)
    return DALLEConfig(**{**values, **overrides})


def copy_task(config: DALLEConfig, count: int = 64):
    """Captions of one word w in 0..5; the image is all code w. Learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(0)
    words = torch.randint(0, 6, (count,), generator=g)
    text = config.text_vocab_size + torch.arange(config.text_seq_len).repeat(count, 1)  # padding ...
    text[:, 0] = words  # ... after one real token
    codes = words[:, None, None].expand(count, config.image_size, config.image_size).clone()
    return text, codes


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    s = TrainSettings(steps=1000, lr=1e-3, warmup_steps=100, final_lr_fraction=0.1)
    assert learning_rate(0, s) == pytest.approx(1e-5)
    assert learning_rate(49, s) == pytest.approx(5e-4)
    assert learning_rate(99, s) == pytest.approx(1e-3)
    assert learning_rate(100, s) == pytest.approx(1e-3)
    assert learning_rate(550, s) == pytest.approx(0.55e-3)  # half-way down the cosine
    assert learning_rate(999, s) == pytest.approx(1e-4, rel=1e-3)


def test_weight_decay_only_on_linear_weight_matrices():
    model = DALLE(small_config())
    decay, no_decay = parameter_groups(model, 0.045)
    assert decay["weight_decay"] == 0.045 and no_decay["weight_decay"] == 0.0
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    assert {id(p) for p in decay["params"]} == linear_weights
    embeddings = [m.weight for m in model.modules() if isinstance(m, (nn.Embedding, nn.LayerNorm))]
    assert all(id(p) in {id(q) for q in no_decay["params"]} for p in embeddings)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_training_lowers_the_loss_and_writes_log_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    config = small_config()
    model = DALLE(config)
    text, codes = copy_task(config)
    settings = TrainSettings(steps=60, batch_size=16, lr=3e-3, warmup_steps=5, log_every=5, eval_every=20,
                             save_every=20)
    log = train_dalle(model, text, codes, settings, checkpoint=tmp_path / "m.safetensors",
                      log_path=tmp_path / "log.csv", validation=(text[:16], codes[:16]), progress=False)
    first, last = log[0], log[-1]
    # chance level is ln 6 = 1.79 nats per image code; the image is a function of the caption
    assert first["image_loss"] > 1.5 and last["image_loss"] < 0.5 * first["image_loss"]
    assert last["val_image_loss"] < 0.5 * log[0]["val_image_loss"]
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [int(r["step"]) for r in rows] == [row["step"] for row in log] and rows[-1]["step"] == "59"
    loaded = load_dalle(tmp_path / "m.safetensors")
    assert loaded.config == config
    assert not list(tmp_path.glob("*.tmp"))


class LossTurnsNaN(DALLE):
    """A model whose loss becomes NaN from the ``bad_step``-th call on."""

    bad_step = 5

    def loss(self, text_ids, image_codes):
        self.calls = getattr(self, "calls", 0) + 1
        losses = super().loss(text_ids, image_codes)
        if self.calls > self.bad_step:
            losses["loss"] = losses["loss"] * float("nan")
        return losses


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    from safetensors import safe_open

    torch.manual_seed(0)
    config = small_config()
    model = LossTurnsNaN(config)
    text, codes = copy_task(config)
    path = tmp_path / "m.safetensors"
    settings = TrainSettings(steps=20, batch_size=8, warmup_steps=1, save_every=2, log_every=1)
    log = train_dalle(model, text, codes, settings, checkpoint=path, progress=False)
    assert len(log) == LossTurnsNaN.bad_step  # steps 0..4 ran, step 5 stopped before its update
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["step"] == "4"  # saved after step 4 (the last multiple of 2)
        saved = {name: f.get_tensor(name) for name in f.keys()}
    assert all(torch.isfinite(t.float()).all() for t in saved.values())


def test_codes_are_encoded_once_then_read_from_the_cache(tmp_path, monkeypatch):
    from dalle_lesson import dvae as dvae_module
    from dalle_lesson.data import ShapesDataset
    from dalle_lesson.dvae import DiscreteVAE, DVAEConfig, save_dvae

    torch.manual_seed(0)
    dvae = DiscreteVAE(DVAEConfig.lesson())
    dvae_path = save_dvae(dvae, tmp_path / "dvae.safetensors")
    dataset = ShapesDataset(length=6, image_size=32, split="train")
    codes, captions = cached_codes(dataset, "six", dvae_path, tmp_path / "cache", progress=False)
    assert codes.dtype == torch.int16 and codes.shape == (6, 8, 8)
    assert captions == [dataset[i][1] for i in range(6)]
    reference = dvae_module.load_dvae(dvae_path)
    assert torch.equal(codes.long(), reference.encode(torch.stack([dataset[i][0] for i in range(6)])))

    def no_encoding(*args, **kwargs):
        raise AssertionError("the dVAE was loaded again instead of reading the cache")

    monkeypatch.setattr(dvae_module, "load_dvae", no_encoding)
    again, again_captions = cached_codes(dataset, "six", dvae_path, tmp_path / "cache", progress=False)
    assert torch.equal(again, codes) and again_captions == captions


def test_training_rejects_mismatched_data():
    model = DALLE(small_config())
    text, codes = copy_task(model.config)
    with pytest.raises(ValueError, match=r"\[N, 4, 4\]"):
        train_dalle(model, text, codes[:, :2], TrainSettings(steps=1), progress=False)
    with pytest.raises(ValueError, match="captions"):
        train_dalle(model, text[:3], codes, TrainSettings(steps=1), progress=False)


def test_command_line_trains_a_small_model(tmp_path):
    from dalle_lesson.cli import main
    from dalle_lesson.dvae import DiscreteVAE, DVAEConfig, save_dvae

    torch.manual_seed(0)
    dvae_path = save_dvae(DiscreteVAE(DVAEConfig.lesson()), tmp_path / "dvae.safetensors")
    out, log = tmp_path / "dalle.safetensors", tmp_path / "log.csv"
    main(["train", "dalle", "--preset", "tiny", "--d-model", "32", "--layers", "2", "--heads", "2",
          "--dvae", str(dvae_path), "--cache-dir", str(tmp_path / "cache"), "--train-images", "16",
          "--val-images", "8", "--steps", "3", "--batch-size", "4", "--fp16", "--out", str(out), "--log", str(log)])
    model = load_dalle(out)
    assert (model.config.d_model, model.config.n_layers, model.config.image_size) == (32, 2, 8)
    assert len(list(csv.DictReader(open(log)))) == 2  # steps 0 and 2 (the last)
