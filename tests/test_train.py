"""The training engine: recipe, loss falls, exact resume, seeds, NaN stop, many processes, the CLI."""

import csv
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from dalle_lesson import checkpoint
from dalle_lesson.cli import main
from dalle_lesson.dalle import DALLE, DALLEConfig, load_dalle, validation_loss
from dalle_lesson.stages import cached_codes, dalle_stage, dvae_stage
from dalle_lesson.train import Recipe, TrainingDiverged, fit, learning_rate, parameter_groups, step_indices

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


# ---- the pieces of a step ---------------------------------------------------------------


def test_learning_rate_warms_up_then_decays_to_the_final_fraction():
    r = Recipe(steps=1000, lr=1e-3, warmup_steps=100, final_lr_fraction=0.1)
    assert learning_rate(0, r) == pytest.approx(1e-5)
    assert learning_rate(49, r) == pytest.approx(5e-4)
    assert learning_rate(99, r) == pytest.approx(1e-3)
    assert learning_rate(100, r) == pytest.approx(1e-3)
    assert learning_rate(550, r) == pytest.approx(0.55e-3, rel=1e-2)  # half-way down the cosine
    assert learning_rate(999, r) == pytest.approx(1e-4)  # the last step is at the floor


def test_weight_decay_only_on_linear_weight_matrices():
    model = DALLE(small_config())
    decay, no_decay = parameter_groups(model, 0.045, decay_only_matrices=True)
    assert decay["weight_decay"] == 0.045 and no_decay["weight_decay"] == 0.0
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    assert {id(p) for p in decay["params"]} == linear_weights
    embeddings = [m.weight for m in model.modules() if isinstance(m, (nn.Embedding, nn.LayerNorm))]
    assert all(id(p) in {id(q) for q in no_decay["params"]} for p in embeddings)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    (everything,) = parameter_groups(model, 0.1, decay_only_matrices=False)
    assert len(everything["params"]) == len(list(model.parameters()))


def test_batches_depend_on_seed_and_step_only():
    r = Recipe(batch_size=8, seed=3)
    assert torch.equal(step_indices(5, r, 100), step_indices(5, r, 100))
    assert not torch.equal(step_indices(5, r, 100), step_indices(6, r, 100))
    assert not torch.equal(step_indices(5, r, 100), step_indices(5, Recipe(batch_size=8, seed=4), 100))


@pytest.mark.parametrize("change, message", [
    ({"steps": 0}, "steps must be at least 1"), ({"batch_size": 0}, "batch-size"), ({"lr": float("nan")}, "lr"),
    ({"precision": "fp8"}, "precision"), ({"seed": 2**64}, "seed"), ({"grad_accum": 0}, "grad-accum"),
])
def test_nonsense_recipes_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        Recipe(**change).check()


# ---- training -----------------------------------------------------------------------------


def test_training_lowers_the_loss_and_writes_log_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    config = small_config()
    model = DALLE(config)
    text, codes = copy_task(config)
    recipe = Recipe(steps=60, batch_size=16, lr=3e-3, warmup_steps=5, log_every=5, eval_every=20, save_every=20)
    stage = dalle_stage(model, text, codes, validation=(text[:16], codes[:16]))
    before = validation_loss(model, text[:16], codes[:16])["image_loss"]
    log = fit(stage, recipe, out=tmp_path / "m.safetensors", log_path=tmp_path / "log.csv", progress=False)
    # chance level is ln 6 = 1.79 nats per image code; the image is a function of the caption
    assert before > 1.5 and log[-1]["image_loss"] < 0.5 * before
    validated = [row for row in log if "val_image_loss" in row]
    assert [row["step"] for row in validated] == [20, 40, 60]
    assert validated[-1]["val_image_loss"] < 0.5 * before
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [int(r["step"]) for r in rows] == [row["step"] for row in log] and rows[-1]["step"] == "60"
    loaded = load_dalle(tmp_path / "m.safetensors")
    assert loaded.config == config
    assert checkpoint.read_metadata(tmp_path / "m.safetensors")["recipe"]["steps"] == 60
    assert not list(tmp_path.glob("*.tmp"))


def test_gradient_accumulation_gives_the_same_step():
    """Two micro-batches of 8 give the update of one batch of 16 (the loss is a mean)."""
    config = small_config()
    text, codes = copy_task(config)
    weights = []
    for accum in (1, 2):
        torch.manual_seed(0)
        model = DALLE(config)
        fit(dalle_stage(model, text, codes), Recipe(steps=3, batch_size=16, grad_accum=accum), progress=False)
        weights.append(model.state_dict())
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], atol=1e-6, rtol=1e-5)


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
    torch.manual_seed(0)
    config = small_config()
    model = LossTurnsNaN(config)
    text, codes = copy_task(config)
    path = tmp_path / "m.safetensors"
    recipe = Recipe(steps=20, batch_size=8, warmup_steps=1, save_every=2, log_every=1)
    with pytest.raises(TrainingDiverged, match=r"step 6: the loss is nan.*\(step 4\), is intact"):
        fit(dalle_stage(model, text, codes), recipe, out=path, progress=False)
    assert checkpoint.read_metadata(path)["step"] == 4  # saved after steps 2 and 4, never after the NaN
    saved = load_file(str(path))
    assert all(torch.isfinite(t.float()).all() for t in saved.values())
    # the bad step was not applied: the live weights are still finite
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_weights_that_turn_infinite_are_never_saved(tmp_path):
    """A finite loss and gradient can still step to infinite weights: that is never written."""
    torch.manual_seed(0)
    config = small_config()
    model = DALLE(config)
    text, codes = copy_task(config)
    path = tmp_path / "m.safetensors"
    fit(dalle_stage(model, text, codes), Recipe(steps=2, batch_size=8, save_every=1), out=path, progress=False)
    good = path.read_bytes()
    with torch.no_grad():
        model.head.weight[0, 0] = float("inf")  # as if the update had overflowed
    stage = dalle_stage(model, text, codes)
    stage.loss = lambda model, batch, step: {"loss": (model.text_position.weight ** 2).sum()}  # finite, grads too
    with pytest.raises(TrainingDiverged, match="not finite after step 1; not saved"):
        fit(stage, Recipe(steps=2, batch_size=8, save_every=1), out=path, progress=False)
    assert path.read_bytes() == good


# ---- the command line, as a user meets it --------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dvae(tmp_path_factory):
    from dalle_lesson.dvae import DiscreteVAE, DVAEConfig, save_dvae

    torch.manual_seed(0)
    return save_dvae(DiscreteVAE(DVAEConfig.lesson()), tmp_path_factory.mktemp("dvae") / "dvae.safetensors")


def stage_arguments(stage: str, tmp_path, tiny_dvae) -> list[str]:
    """The smallest command line of each stage (a few seconds each)."""
    common = ["--batch-size", "4", "--save-every", "2", "--log-every", "1"]
    extra = {
        "vae": ["--train-images", "16", "--val-images", "4", "--width", "8", "--latent-dim", "2"],
        "dvae": ["--train-images", "16", "--val-images", "4", "--n-hid", "8", "--vocab-size", "16"],
        "vqvae": ["--train-images", "16", "--val-images", "4", "--embedding-dim", "4"],
        "dalle": ["--train-images", "16", "--val-images", "4", "--d-model", "32", "--layers", "2", "--heads", "2",
                  "--dvae", str(tiny_dvae), "--cache-dir", str(tmp_path / "cache")],
    }[stage]
    return ["train", stage, *common, *extra]


def final_weights(path) -> dict:
    return checkpoint.load_resume_state(path)["model"]  # fp32, whatever the checkpoint's dtype


@pytest.mark.parametrize("stage", ["vae", "dvae", "vqvae", "dalle"])
def test_the_same_seed_gives_the_same_weights(stage, tmp_path, tiny_dvae):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.safetensors"
        main([*stage_arguments(stage, tmp_path, tiny_dvae), "--steps", "3", "--seed", "7", "--out", str(out)])
        runs.append(final_weights(out))
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    other = tmp_path / "other.safetensors"
    main([*stage_arguments(stage, tmp_path, tiny_dvae), "--steps", "3", "--seed", "8", "--out", str(other)])
    assert not all(torch.equal(runs[0][k], final_weights(other)[k]) for k in runs[0])


@pytest.mark.parametrize("stage", ["dvae", "dalle"])
def test_resume_is_exact(stage, tmp_path, tiny_dvae):
    """Six steps in one go == three steps, stop, then --resume for the rest (bitwise on CPU)."""
    whole, halves = tmp_path / "whole.safetensors", tmp_path / "halves.safetensors"
    arguments = [*stage_arguments(stage, tmp_path, tiny_dvae), "--steps", "6"]
    main([*arguments, "--out", str(whole)])
    main([*arguments, "--out", str(halves), "--stop-at", "3"])
    assert checkpoint.read_metadata(halves)["step"] == 3
    main(["train", stage, "--out", str(halves), "--resume", *arguments[2:]])
    assert checkpoint.read_metadata(halves)["step"] == 6
    a, b = final_weights(whole), final_weights(halves)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_file(str(whole)).keys() == load_file(str(halves)).keys()
    log = [int(row["step"]) for row in csv.DictReader(open(tmp_path / "halves.csv"))]
    assert log == [1, 2, 3, 4, 5, 6]  # one log across both halves


def test_resume_without_a_run_and_overwriting_are_refused(tmp_path, tiny_dvae):
    out = tmp_path / "m.safetensors"
    arguments = [*stage_arguments("vae", tmp_path, tiny_dvae), "--steps", "2"]
    with pytest.raises(SystemExit, match="no checkpoint at .* to continue"):
        main([*arguments, "--out", str(out), "--resume"])
    main([*arguments, "--out", str(out)])
    with pytest.raises(SystemExit, match="exists; add --resume .* or --force"):
        main([*arguments, "--out", str(out)])
    main([*arguments, "--out", str(out), "--force"])


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "must be at least 1"), (["--batch-size", "0"], "must be at least 1"),
    (["--threads", "0"], "must be at least 1"), (["--seed", str(2**64)], "2\\*\\*32"),
])
def test_nonsense_flags_are_refused_by_the_parser(flags, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["train", "vae", *flags])
    assert stopped.value.code == 2 and message.replace("\\", "") in capsys.readouterr().err.replace("\\", "")


def test_bad_output_paths_are_refused_before_any_work(tmp_path, monkeypatch):
    import dalle_lesson.stages as stages

    monkeypatch.setattr(stages, "preload_images", lambda *a: pytest.fail("work started before the check"))
    with pytest.raises(SystemExit, match="is a directory"):
        main(["train", "vae", "--out", str(tmp_path)])
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit, match="cannot write in"):
        main(["train", "vae", "--out", str(tmp_path / "a_file" / "m.safetensors")])


def test_a_diverging_command_exits_non_zero_naming_the_step(tmp_path, tiny_dvae):
    out = tmp_path / "m.safetensors"
    with pytest.raises(SystemExit) as stopped:
        main([*stage_arguments("vae", tmp_path, tiny_dvae), "--steps", "20", "--save-every", "1",
              "--lr", "1e30", "--out", str(out)])
    assert "step" in str(stopped.value.code) and "Try a smaller --lr" in str(stopped.value.code)
    if out.exists():  # whatever is on disk has finite weights
        assert all(torch.isfinite(t.float()).all() for t in load_file(str(out)).values())


def test_world_size_without_a_launcher_is_a_clear_error(tmp_path, tiny_dvae, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="torchrun --nproc_per_node 2"):
        main([*stage_arguments("vae", tmp_path, tiny_dvae), "--steps", "1", "--out", str(tmp_path / "m.safetensors")])


def test_train_bpe_needs_out_and_never_overwrites_without_force(tmp_path, capsys):
    from dalle_lesson.data import shipped_path

    with pytest.raises(SystemExit):
        main(["train", "bpe", "--vocab-size", "520"])
    assert "--out" in capsys.readouterr().err
    shipped = shipped_path("tokenizer/course_bpe.txt")
    before = shipped.read_bytes()
    with pytest.raises(SystemExit, match="exists"):
        main(["train", "bpe", "--vocab-size", "520", "--out", str(shipped)])
    assert shipped.read_bytes() == before
    out = tmp_path / "bpe.txt"
    main(["train", "bpe", "--vocab-size", "520", "--corpus", "shapes", "--out", str(out)])
    assert len(out.read_text().splitlines()) == 1 + 8  # header + 8 merges


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "dalle", "--help"])
    text = capsys.readouterr().out
    assert "(default: 1500)" in text and "(default: 0.001)" in text and "--resume" in text


# ---- the paper's sizes run through the same engine ------------------------------------------


def test_one_step_of_the_paper_dvae_at_256(one_thread):
    from dalle_lesson.dvae import DiscreteVAE, DVAEConfig

    torch.manual_seed(0)
    model = DiscreteVAE(DVAEConfig.paper())
    images = torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8)
    log = fit(dvae_stage(model, images, steps=1), Recipe(steps=1, batch_size=1, log_every=1), progress=False)
    assert len(log) == 1 and torch.isfinite(torch.tensor(log[0]["loss"]))


def test_one_step_of_a_narrow_transformer_on_a_32x32_grid():
    config = DALLEConfig.paper(d_model=64, n_layers=2, n_heads=2, text_vocab_size=64, image_vocab_size=64,
                               activation_checkpointing=True)
    torch.manual_seed(0)
    model = DALLE(config)
    text = torch.randint(0, 64, (2, config.text_seq_len))
    codes = torch.randint(0, 64, (2, 32, 32))
    log = fit(dalle_stage(model, text, codes), Recipe(steps=1, batch_size=2, log_every=1), progress=False)
    assert len(log) == 1 and log[0]["image_loss"] == pytest.approx(torch.log(torch.tensor(64.0)).item(), rel=0.1)


# ---- many processes -------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun is not installed")
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_dvae):
    """torchrun --nproc_per_node 2 (Gloo, CPU): same losses and weights as one process."""
    arguments = [*stage_arguments("dalle", tmp_path, tiny_dvae), "--steps", "4", "--caption-dropout", "0",
                 "--threads", "1"]
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    main([*arguments, "--out", str(one)])  # also fills the codes cache the two processes read
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    result = subprocess.run([torchrun if os.path.exists(torchrun) else "torchrun", "--standalone",
                             "--nproc_per_node", "2", "-m", "dalle_lesson.cli", *arguments, "--out", str(two)],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = final_weights(one), final_weights(two)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
    losses = [[float(row["loss"]) for row in csv.DictReader(open(path.with_suffix(".csv")))] for path in (one, two)]
    assert len(losses[0]) == 4
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=1e-5, rtol=0)


def torchrun(*arguments, timeout=300):
    launcher = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return subprocess.run([launcher if os.path.exists(launcher) else "torchrun", "--standalone", "--nproc_per_node",
                           "2", "-m", "dalle_lesson.cli", *arguments], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun is not installed")
def test_two_sharded_processes_match_one_and_resume_exactly(tmp_path, tiny_dvae):
    """FSDP over 2 Gloo processes, stopped after 2 of 4 steps and resumed from the sharded
    checkpoint: the same losses and final weights (to 1e-5) as one plain process; the
    gathered file equals the one `gather` writes from the shards."""
    arguments = [*stage_arguments("dalle", tmp_path, tiny_dvae), "--steps", "4", "--caption-dropout", "0",
                 "--threads", "1", "--lr", "1e-2", "--warmup", "0"]  # big steps: a 1e-5 match means something
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    main([*arguments, "--out", str(one)])  # also fills the codes cache the two processes read
    first = torchrun(*arguments, "--out", str(two), "--shard", "--stop-at", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert checkpoint.read_sharded_header(two)["step"] == 2
    assert sorted(p.name for p in checkpoint.sharded_dir(two).iterdir()) == ["latest", "step-000002"]
    second = torchrun(*arguments, "--out", str(two), "--resume")  # a sharded run resumes sharded
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = final_weights(one), load_file(str(two))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0)
    losses = [[float(row["loss"]) for row in csv.DictReader(open(path.with_suffix(".csv")))] for path in (one, two)]
    assert len(losses[1]) == 4 and losses[0][-1] < losses[0][0] - 0.1  # the weights really moved
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=1e-5, rtol=0)
    gathered = tmp_path / "gathered.safetensors"
    main(["gather", str(two), "--out", str(gathered)])
    assert all(torch.equal(b[name], tensor) for name, tensor in load_file(str(gathered)).items())
    assert load_dalle(gathered).config == load_dalle(two).config
    with pytest.raises(SystemExit, match="sharded run: resume it under torchrun"):
        main(["train", "dalle", "--out", str(two), "--resume", *arguments[2:]])


# ---- codes are computed once ----------------------------------------------------------------


def test_codes_are_encoded_once_then_read_from_the_cache(tmp_path, monkeypatch, tiny_dvae):
    from dalle_lesson import stages
    from dalle_lesson.data import ShapesDataset
    from dalle_lesson.dvae import load_dvae

    dataset = ShapesDataset(length=6, image_size=32, split="train")
    codes, captions = cached_codes(dataset, "six", tiny_dvae, tmp_path / "cache", progress=False)
    assert codes.dtype == torch.int16 and codes.shape == (6, 8, 8)
    assert captions == [dataset[i][1] for i in range(6)]
    reference = load_dvae(tiny_dvae)
    assert torch.equal(codes.long(), reference.encode(torch.stack([dataset[i][0] for i in range(6)])))
    monkeypatch.setattr(stages, "load_dvae", lambda *a, **k: pytest.fail("encoded again instead of reading the cache"))
    again, again_captions = cached_codes(dataset, "six", tiny_dvae, tmp_path / "cache", progress=False)
    assert torch.equal(again, codes) and again_captions == captions


def test_the_transformer_stage_rejects_mismatched_data():
    model = DALLE(small_config())
    text, codes = copy_task(model.config)
    with pytest.raises(ValueError, match=r"\[N, 4, 4\]"):
        dalle_stage(model, text, codes[:, :2])
    with pytest.raises(ValueError, match="captions"):
        dalle_stage(model, text[:3], codes)


def test_a_folder_whose_captions_change_is_encoded_again(tmp_path, tiny_dvae):
    """Same file count, new captions: the cache must not hand back the old ones."""
    from PIL import Image

    from dalle_lesson.data import ImageFolderDataset
    from dalle_lesson.stages import codes_cache_name

    folder = tmp_path / "pictures"
    folder.mkdir()
    for name, colour in (("a", "red"), ("b", "blue")):
        Image.new("RGB", (32, 32), colour).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {colour} square")
    first = ImageFolderDataset(folder, image_size=32)
    _, captions = cached_codes(first, codes_cache_name(first, "x"), tiny_dvae, tmp_path / "cache", progress=False)
    assert captions == ["a red square", "a blue square"]
    (folder / "a.txt").write_text("a crimson square")
    second = ImageFolderDataset(folder, image_size=32)
    assert codes_cache_name(second, "x") != codes_cache_name(first, "x")
    _, captions = cached_codes(second, codes_cache_name(second, "x"), tiny_dvae, tmp_path / "cache", progress=False)
    assert captions == ["a crimson square", "a blue square"]
