"""The whole DALL·E pipeline: caption -> BPE ids -> sampled image codes -> pixels.

Three trained parts, each from its own lesson, joined here::

    pipeline = Pipeline.load()                       # the shipped tokenizer, transformer and dVAE
    result = pipeline("a red circle", num_images=8, seed=0)
    result.images                                    # FloatTensor[8, 3, 32, 32] in [0, 1]
    result.save_grid("grid.png")                     # a captioned grid
    best = pipeline("a red circle", num_images=4, candidates=32)   # CLIP keeps its 4 favourites of 32

``dalle-lesson generate "a red circle" --out grid.png`` runs exactly this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from dalle_lesson.bpe import BPETokenizer, load_course_tokenizer, tokenize_batch
from dalle_lesson.clip import clip_scores, load_clip
from dalle_lesson.dalle import DALLE, load_dalle
from dalle_lesson.dvae import DiscreteVAE, load_dvae
from dalle_lesson.sampling import check_memory, check_sampling_settings, generate

# The sampling settings that drew the best pictures with the shipped checkpoints
# (benchmarks/sampling_settings.py, chosen on training-distribution captions, reported on
# held-out ones). The CLI and notebook 00 use them; ``Pipeline.__call__`` itself samples from the
# model's own distribution unless told otherwise, so ``pipeline(caption, **SAMPLING_DEFAULTS)``.
SAMPLING_DEFAULTS = {"temperature": 0.8, "top_k": None, "guidance_scale": 2.0}


@dataclass
class Generation:
    """What the pipeline made: images, the codes behind them, and their captions."""

    images: torch.Tensor  # [N, 3, S, S] in [0, 1]
    codes: torch.Tensor  # [N, H, W] image codes
    captions: list[str]
    scores: torch.Tensor | None = None  # [N] CLIP's score of each image, when candidates were reranked

    def save_grid(self, path: str | Path, ncols: int | None = None) -> str:
        """Save the images with their captions as a PNG grid (``dalle_lesson.viz.save_grid``)."""
        from dalle_lesson.viz import save_grid

        ncols = ncols or min(len(self.images), 4)
        if len(set(self.captions)) == 1:  # one caption: say it once, as the title
            return save_grid(list(self.images), str(path), ncols=ncols, title=self.captions[0] or "(no caption)")
        return save_grid(list(self.images), str(path), self.captions, ncols=ncols)


@dataclass
class Pipeline:
    """A tokenizer, a DALL·E transformer and a dVAE that agree on their vocabularies."""

    tokenizer: BPETokenizer
    model: DALLE
    dvae: DiscreteVAE
    clip_path: str | Path | None = None  # the CLIP that reranks candidates (None: the shipped one)
    _clip: object = field(default=None, repr=False)

    def __post_init__(self):
        c, d = self.model.config, self.dvae.config
        if self.tokenizer.vocab_size != c.text_vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but the transformer expects "
                             f"text_vocab_size={c.text_vocab_size}; load the tokenizer it was trained with")
        if d.vocab_size != c.image_vocab_size or d.grid_size != c.image_size:
            raise ValueError(f"the dVAE makes {d.grid_size}x{d.grid_size} grids of {d.vocab_size} codes but the "
                             f"transformer models {c.image_size}x{c.image_size} grids of {c.image_vocab_size}; "
                             "load the dVAE whose codes it was trained on")

    @classmethod
    def load(cls, model_path: str | Path | None = None, dvae_path: str | Path | None = None,
             tokenizer_path: str | Path | None = None, device: str | torch.device = "cpu",
             clip_path: str | Path | None = None) -> "Pipeline":
        """Load the parts; ``None`` means the checkpoint shipped in ``data/`` (CLIP is loaded
        only when candidates are reranked)."""
        tokenizer = BPETokenizer.load(tokenizer_path) if tokenizer_path is not None else load_course_tokenizer()
        return cls(tokenizer, load_dalle(model_path, device=device), load_dvae(dvae_path, device=device), clip_path)

    @property
    def clip(self):
        """The course CLIP, loaded the first time candidates are reranked."""
        if self._clip is None:
            self._clip = load_clip(self.clip_path, device=self.model.head.weight.device)
        return self._clip

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions -> LongTensor[B, text_seq_len]; too long ones are cut with a warning."""
        return tokenize_batch(self.tokenizer, list(captions), self.model.config.text_seq_len)

    def __call__(self, captions: str | Sequence[str], num_images: int = 8, candidates: int | None = None,
                 **sampling) -> Generation:
        """Draw ``num_images`` images for each caption (``sampling``: the options of
        :func:`dalle_lesson.sampling.generate`, e.g. ``temperature``, ``top_k``, ``seed``).

        With ``candidates=N``, draw N images per caption and keep the ``num_images`` that the
        course CLIP scores best, best first (the paper draws 512 and keeps CLIP's favourites).
        """
        if isinstance(captions, str):
            captions = [captions]
        captions = list(captions)
        if not captions:
            raise ValueError("give at least one caption (an empty string \"\" is fine: it means no caption)")
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be a whole number >= 1, got {num_images!r}")
        if candidates is not None and (isinstance(candidates, bool) or not isinstance(candidates, int)
                                       or candidates < num_images):
            raise ValueError(f"candidates must be a whole number >= num_images ({num_images}), got {candidates!r}")
        draws = candidates or num_images
        check_sampling_settings(sampling.get("temperature", 1.0), sampling.get("top_k"), sampling.get("top_p"),
                                sampling.get("guidance_scale"), self.model.config.image_vocab_size)
        check_memory(self.model.config, len(captions) * draws, sampling.get("guidance_scale") is not None,
                     self.model.head.weight.device)  # before tokenizing a huge batch
        text_ids = self.tokenize(captions).repeat_interleave(draws, dim=0)  # each caption, `draws` times
        codes = generate(self.model, text_ids, **sampling)
        images = self.dvae.decode(codes.to(next(self.dvae.parameters()).device)).cpu()
        repeated = [caption for caption in captions for _ in range(num_images)]
        if candidates is None:
            return Generation(images, codes.cpu(), repeated)
        kept, scores = [], []
        for i, caption in enumerate(captions):  # rerank each caption's candidates
            group = slice(i * draws, (i + 1) * draws)
            caption_scores = clip_scores(self.clip, images[group], caption)
            best = torch.argsort(caption_scores, descending=True, stable=True)[:num_images]
            kept.append(best + i * draws)
            scores.append(caption_scores[best])
        kept = torch.cat(kept)
        return Generation(images[kept], codes.cpu()[kept], repeated, torch.cat(scores))


# --------------------------------------------------------------------------------------
# An interactive panel (the notebook's widget) and the plain function behind it
# --------------------------------------------------------------------------------------


def sample_figure(pipeline: Pipeline, caption: str, temperature: float = 1.0, top_k: int | None = None,
                  num_images: int = 8, seed: int = 0):
    """Draw ``num_images`` images for ``caption`` and return them as a matplotlib figure.

    This is what the panel's button does; it is a plain function so tests and scripts can
    call it. ``top_k`` of ``None`` or 0 keeps every code.
    """
    from dalle_lesson.viz import show_grid

    result = pipeline(caption, num_images=num_images, temperature=temperature, top_k=top_k or None, seed=seed)
    title = f"{caption!r}  (temperature {temperature:g}, top-k {top_k or 'all'}, seed {seed})"
    return show_grid(list(result.images), ncols=min(num_images, 8), title=title)


def sampling_panel(pipeline: Pipeline, caption: str = "a small red circle above a big blue square"):
    """An ipywidgets panel: caption, temperature, top-k, number of images, a button.

    Pressing the button calls :func:`sample_figure` with the widgets' values and shows the
    figure below (errors, e.g. a bad setting, are shown as text instead).
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    caption_box = widgets.Text(value=caption, description="caption", layout=widgets.Layout(width="32em"))
    temperature = widgets.FloatSlider(value=1.0, min=0.1, max=2.0, step=0.1, description="temperature")
    top_k = widgets.IntSlider(value=0, min=0, max=pipeline.model.config.image_vocab_size, step=1,
                              description="top-k (0=all)")
    count = widgets.IntSlider(value=8, min=1, max=16, description="images")
    seed = widgets.IntText(value=0, description="seed")
    button = widgets.Button(description="Draw", button_style="primary")
    output = widgets.Output()

    def on_click(_button=None):
        output.clear_output(wait=True)
        with output:
            try:
                figure = sample_figure(pipeline, caption_box.value, temperature.value, top_k.value, count.value,
                                       seed.value)
            except ValueError as error:
                print(f"cannot draw: {error}")
            else:
                display(figure)
                plt.close(figure)  # shown once, in the panel, not again at the end of the cell

    button.on_click(on_click)
    return widgets.VBox([caption_box, widgets.HBox([temperature, top_k]), widgets.HBox([count, seed, button]),
                         output])
