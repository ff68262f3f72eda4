"""CLIP-guided images against the transformer's samples, under the same scorer.

For the same seeded captions as ``benchmarks/composition.py`` (its training-distribution
"test" split and its held-out split), make one picture per caption three ways and score
every picture with ``dalle_lesson.evaluate``:

* ``CLIP-guided``: ``dalle_lesson.clip_guided.generate``, dVAE codes optimised against
  the course CLIP (no transformer), one picture per caption;
* ``transformer, N = 1``: the shipped transformer's first sample with the pipeline's
  default sampling settings (``dalle_lesson.pipeline.SAMPLING_DEFAULTS``);
* ``transformer, CLIP best of 16``: the sample of 16 that the course CLIP ranks first.

Reported per split: full-match rate (95 % Wilson interval), per-attribute rates (colour,
shape, size of every object, relation, object count), the course CLIP's mean score of the
chosen pictures, and seconds per final picture (CLIP-guided: the optimisation's wall
time over the batch; N = 1: sampling; best of 16: 16 samples and their CLIP scores).

    python benchmarks/clip_guided.py            # 30 captions per split (about 9 minutes on one thread)
    python benchmarks/clip_guided.py --quick    # a smoke test of a few seconds

The CLIP-guided settings are ``clip_guided.generate``'s defaults, chosen on 8 to 24 captions
of the *training* split (never these): straight-through Gumbel codes (soft codes left a gap
between the relaxed and the argmax picture at small lr, and scored no better at lr 1); lr 1
(0.1 hardly moved the argmax codes in 200 steps, 0.3 got lower CLIP scores, 3 about the
same); 150 steps (200 did no better); 8 augmented copies (16 cost twice as much, no better
under the scorer; none: higher CLIP scores, no better under the scorer); logits starting at
std 2 (it freed some captions that stalled on an empty canvas from std 0.1). Differences
between these settings were within the noise of 24 captions; see ``dalle_lesson/clip_guided.py``.

Writes benchmarks/results/clip_guided.json and prints a table.
"""

from __future__ import annotations

import argparse
import inspect
import time
from pathlib import Path

import torch

# Run as a script, so benchmarks/ is on the path: the caption choice and the rates of composition.py.
from composition import ATTRIBUTES, SPLITS, one_picture_rates, report_header, split_captions, write_report

from dalle_lesson import clip_guided
from dalle_lesson.clip import clip_scores, load_clip
from dalle_lesson.pipeline import SAMPLING_DEFAULTS, Pipeline

RESULTS = Path(__file__).parent / "results" / "clip_guided.json"
# The settings of clip_guided.generate this script exposes, with the package's defaults (chosen on training captions).
GENERATE_DEFAULTS = {name: p.default for name, p in inspect.signature(clip_guided.generate).parameters.items()
                     if name in ("steps", "lr", "tau", "augmentations", "hard", "max_shift", "noise", "init_std")}


def guided_pictures(clip, dvae, captions: list[str], options: dict, batch: int) -> tuple[torch.Tensor, float]:
    """One CLIP-guided picture per caption, ``batch`` captions optimised together; and seconds per picture."""
    images, seconds = [], 0.0
    for start in range(0, len(captions), batch):
        group = captions[start : start + batch]
        result = clip_guided.generate(clip, dvae, group, seed=start, progress=False, **options)
        images.append(result.images)
        seconds += result.seconds
        print(f"  CLIP-guided {start + len(group)}/{len(captions)}: mean CLIP score {result.scores.mean():.3f}",
              flush=True)
    return torch.cat(images), seconds / len(captions)


def transformer_pictures(pipeline: Pipeline, clip, captions: list[str], seed: int, candidates: int):
    """The first sample and CLIP's best of ``candidates`` per caption; seconds per sample and per CLIP score."""
    first, best, sampling_s, clip_s = [], [], 0.0, 0.0
    for i, caption in enumerate(captions):
        start = time.perf_counter()
        images = pipeline(caption, num_images=candidates, seed=seed * 100_003 + i, **SAMPLING_DEFAULTS).images
        sampling_s += time.perf_counter() - start
        start = time.perf_counter()
        scores = clip_scores(clip, images, caption)  # [candidates]
        clip_s += time.perf_counter() - start
        first.append(images[0])
        best.append(images[int(scores.argmax())])
        if (i + 1) % 10 == 0 or i + 1 == len(captions):
            print(f"  transformer {i + 1}/{len(captions)}", flush=True)
    samples = len(captions) * candidates
    return torch.stack(first), torch.stack(best), sampling_s / samples, clip_s / samples


def summarize(images: torch.Tensor, captions: list[str], clip) -> dict:
    """Full match and per-attribute rates of one picture per caption, and CLIP's mean score of them."""
    out = one_picture_rates(images, captions)
    out["clip_score_mean"] = round(float(clip_scores(clip, images, captions).mean()), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=30, help="captions per split")
    parser.add_argument("--seed", type=int, default=7, help="the caption seed (composition.py's default)")
    parser.add_argument("--candidates", type=int, default=16, help="transformer samples per caption for CLIP's pick")
    for name, default in GENERATE_DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, type=lambda text: text.lower() in ("1", "true", "yes"), default=default,
                                help=f"clip_guided.generate's {name} (default {default})")
        else:
            parser.add_argument(flag, type=type(default), default=default,
                                help=f"clip_guided.generate's {name} (default {default})")
    parser.add_argument("--batch", type=int, default=10, help="captions optimised together")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 captions per split, 5 steps, 2 candidates")
    parser.add_argument("--out", default=None, help=f"default: {RESULTS} ({RESULTS.stem}_quick.json with --quick, "
                                                    "in /tmp)")
    args = parser.parse_args()
    if args.quick:
        args.captions, args.steps, args.candidates = 2, 5, 2
    out = Path(args.out or ("/tmp/clip_guided_quick.json" if args.quick else RESULTS))
    torch.set_num_threads(args.threads)
    pipeline, clip = Pipeline.load(), load_clip()
    options = {name: getattr(args, name) for name in GENERATE_DEFAULTS}
    methods = ("clip_guided", "transformer_n1", f"transformer_clip_best_of_{args.candidates}")
    started = time.perf_counter()
    results = {}
    for label, split in SPLITS:
        captions = [caption for _, caption in split_captions(split, args.captions, args.seed)]
        print(f"{label} ({split}): {len(captions)} captions", flush=True)
        guided, guided_s = guided_pictures(clip, pipeline.dvae, captions, options, args.batch)
        first, best, sample_s, score_s = transformer_pictures(pipeline, clip, captions, args.seed, args.candidates)
        per_image = (guided_s, sample_s, args.candidates * (sample_s + score_s))  # best of N: N samples, N scores
        results[label] = {method: {**summarize(images, captions, clip), "s_per_image": round(seconds, 4)}
                          for method, images, seconds in zip(methods, (guided, first, best), per_image)}
    report = {
        **report_header("clip_guided", args.threads),
        "settings": {"captions_per_split": args.captions, "seed": args.seed, "quick": args.quick,
                     "clip_guided": {**options, "batch": args.batch},
                     "transformer": {"sampling": SAMPLING_DEFAULTS, "candidates": args.candidates},
                     "checkpoints": {"dalle": "shipped", "dvae": "shipped", "tokenizer": "shipped", "clip": "shipped"}},
        "units": "rates are fractions of captions whose one picture is right (full_match: every object's colour, "
                 "shape and size, the relation and the object count); ci95 = 95% Wilson interval; "
                 "clip_score_mean = the course CLIP's cosine of the picture with its caption; "
                 "s_per_image = seconds of one thread per final picture",
        "results": results,
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    write_report(report, out, table(report))


def table(report: dict) -> str:
    n = report["settings"]["transformer"]["candidates"]
    names = {"clip_guided": "CLIP-guided (1 per caption)", "transformer_n1": "transformer, N = 1",
             f"transformer_clip_best_of_{n}": f"transformer, CLIP best of {n}"}

    def pct(entry):
        return "-" if entry["rate"] is None else f"{entry['rate']:.0%}"

    lines = ["| captions | method | full match [95% CI] | " + " | ".join(ATTRIBUTES) + " | CLIP score | s / image |",
             "|" + " --- |" * (5 + len(ATTRIBUTES))]
    for label, methods in report["results"].items():
        for method, s in methods.items():
            full = s["full_match"]
            cell = f"{pct(full)} [{full['ci95'][0]:.0%}, {full['ci95'][1]:.0%}]"
            lines.append(f"| {label} (n={s['captions']}) | {names[method]} | {cell} | "
                         + " | ".join(pct(s[a]) for a in ATTRIBUTES)
                         + f" | {s['clip_score_mean']:.3f} | {s['s_per_image']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
