"""Classifier-free guidance, measured: what the guidance scale does to accuracy, diversity and failures.

With the shipped model (trained with caption dropout 0.1, so it also knows the empty caption),
sweep the guidance scale s over 0, 1, 2, 3, 5, 8 at temperature 0.8 (the CLI's default) and 1
(the paper's), for the seeded captions of ``benchmarks/composition.py`` from the training
distribution (the test split: training's attribute mix, other scenes) and from the held-out split
(shape-colour pairs never seen in training). Every sample is scored with ``dalle_lesson.evaluate``
(N = 1, no reranking). For each (split, temperature, scale):

* full-match accuracy over all samples with a 95 % Wilson interval, apart for one- and two-object
  captions, and the share of captions with at least one fully matching sample among theirs;
* per-attribute accuracy as ``evaluate.summarize`` reports it (colour / shape / size per object of
  the caption, relation per two-object caption, count per image);
* blank rate (the scorer detects no object) and extra-object rate (more objects than the caption has);
* diversity among the samples of one caption, averaged over captions: distinct code grids, the
  mean pairwise share of differing codes, and the mean pairwise distance of the decoded images
  (mean absolute pixel difference and L2 norm of the difference, pixels in [0, 1]);
* seconds per image for sampling (with decoding) and for scoring.

What a scale means (``dalle_lesson.sampling.guided_logits``): the sampled logits are
``conditional + (s - 1) * (conditional - unconditional)``. s = 0 is the unconditional model
alone, s = 1 plain conditional sampling, s > 1 pushes away from what the model draws without a
caption. Both ends are sampled the cheap way, with one stream per image: s = 1 as plain sampling
(``guidance_scale=None``: the same codes bit for bit), s = 0 as plain sampling of the empty caption
(the same logits up to float rounding). Both claims are checked on a small batch in every run and
the checks are written to the JSON. The CLI's ``--guidance 0`` or ``1`` would cost what s > 1 costs.

Every configuration draws from the same seeds (one per chunk of captions), so the scales are
compared on common random numbers. One thread (``torch.set_num_threads(1)``).

    python benchmarks/guidance.py            # 40 captions per split x 8 samples, the whole sweep (~25 min)
    python benchmarks/guidance.py --quick    # a smoke run (~15 s; writes nothing unless --out)
    python benchmarks/guidance.py --split test --out /tmp/test.json   # one split; --merge joins files

Writes benchmarks/results/guidance.json and prints a table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from composition import SPLITS, rate as composition_rate, report_header, shared_settings, split_captions
from dalle_lesson import evaluate
from dalle_lesson.pipeline import SAMPLING_DEFAULTS, Pipeline
from dalle_lesson.sampling import empty_text_ids, generate

RESULTS = Path(__file__).parent / "results" / "guidance.json"
SCALES = (0.0, 1.0, 2.0, 3.0, 5.0, 8.0)
TEMPERATURES = (SAMPLING_DEFAULTS["temperature"], 1.0)
SCALE_MEANING = {
    "formula": "sampled logits = conditional + (s - 1) * (conditional - unconditional) "
               "(dalle_lesson.sampling.guided_logits); unconditional = the same model given the empty caption "
               "(every text position its padding id), which it saw in training through caption dropout 0.1",
    "0": "the unconditional model alone: the caption is ignored (sampled here as plain sampling of the empty caption)",
    "1": "plain conditional sampling, no guidance (sampled here with guidance_scale=None: the same codes)",
    ">1": "guided: pushed away from what the model draws without a caption (two streams per image)",
}


def draw(pipeline: Pipeline, captions: list[str], samples: int, scale: float, temperature: float, seed: int):
    """``samples`` images of each caption at guidance ``scale``; returns (codes [B, h, w], images [B, 3, S, S])."""
    sampling = {"temperature": float(temperature), "top_k": None, "seed": seed}
    if scale == 0:  # the empty caption, one stream per image
        codes = generate(pipeline.model, empty_text_ids(pipeline.model.config, len(captions) * samples), **sampling)
        return codes, pipeline.dvae.decode(codes).cpu()
    generation = pipeline(captions, num_images=samples, guidance_scale=None if scale == 1 else float(scale), **sampling)
    return generation.codes, generation.images


def diversity(codes: torch.Tensor, images: torch.Tensor) -> dict:
    """Distinct grids and mean pairwise distances among the samples of one caption."""
    flat_codes, flat_images = codes.flatten(1), images.flatten(1).double()
    pairs = list(itertools.combinations(range(len(codes)), 2))
    first, second = (torch.tensor(side) for side in zip(*pairs))
    difference = flat_images[first] - flat_images[second]
    return {"distinct_grids": int(torch.unique(flat_codes, dim=0).shape[0]),
            "code_difference": float((flat_codes[first] != flat_codes[second]).double().mean()),
            "abs_pixel": float(difference.abs().mean()),
            "l2": float(difference.norm(dim=1).mean())}


def rate(flags: list[bool]) -> dict:
    """``composition.rate``, with an interval bound of -0.0 (no successes) written as 0.0."""
    entry = composition_rate(flags)
    return {**entry, "ci95": [bound + 0.0 for bound in entry["ci95"]]}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def run_config(pipeline, pairs, samples, scale, temperature, seed, chunk) -> dict:
    """Draw and score ``samples`` images for every (scene, caption) in ``pairs``; one summary dict."""
    scores, objects, per_caption, sampling_s, scoring_s = [], [], [], 0.0, 0.0
    for start in range(0, len(pairs), chunk):
        block = pairs[start:start + chunk]
        captions = [caption for _, caption in block]
        began = time.perf_counter()
        codes, images = draw(pipeline, captions, samples, scale, temperature, seed * 100_003 + start)
        sampling_s += time.perf_counter() - began
        began = time.perf_counter()
        judged = evaluate.score_batch(images, [c for c in captions for _ in range(samples)])
        scoring_s += time.perf_counter() - began
        for k, (scene, _) in enumerate(block):
            group = slice(k * samples, (k + 1) * samples)
            scores += judged[group]
            objects += [len(scene.objects)] * samples
            per_caption.append({"matches": [bool(s.full_match) for s in judged[group]],
                                **diversity(codes[group], images[group])})
    images_n = len(scores)
    summary = evaluate.summarize(scores)
    detected = [len(s.detected) for s in scores]
    return {
        "full_match": rate([bool(s.full_match) for s in scores]),
        "full_match_one_object": rate([bool(s.full_match) for s, n in zip(scores, objects) if n == 1]),
        "full_match_two_objects": rate([bool(s.full_match) for s, n in zip(scores, objects) if n == 2]),
        f"captions_with_a_match_among_{samples}": rate([any(c["matches"]) for c in per_caption]),
        "attributes": {key: (round(summary[key], 4) if summary[key] is not None else None)
                       for key in ("colour_accuracy", "shape_accuracy", "size_accuracy", "relation_accuracy",
                                   "count_accuracy", "full_match_accuracy")},
        "attribute_counts": {key: summary[key] for key in ("images", "scored", "objects", "relations")},
        "blank": rate([n == 0 for n in detected]),
        "extra_objects": rate([n > k for n, k in zip(detected, objects)]),
        "mean_objects_detected": round(mean(detected), 4),
        "diversity_per_caption": {
            "distinct_grids": round(mean(c["distinct_grids"] for c in per_caption), 4),
            "distinct_grids_of": samples,
            "mean_pairwise_code_difference": round(mean(c["code_difference"] for c in per_caption), 4),
            "mean_pairwise_abs_pixel": round(mean(c["abs_pixel"] for c in per_caption), 5),
            "mean_pairwise_l2": round(mean(c["l2"] for c in per_caption), 4),
        },
        "sampling_s_per_image": round(sampling_s / images_n, 5),
        "scoring_s_per_image": round(scoring_s / images_n, 5),
        "sampling_path": {0.0: "plain, empty caption", 1.0: "plain (guidance_scale=None)"}.get(
            scale, f"guided (guidance_scale={scale:g})"),
    }


def equivalence_checks(pipeline: Pipeline, pairs, seed: int) -> dict:
    """The shortcuts for s = 0 and s = 1 against the guided path itself, on the first caption x 4 samples."""
    captions = [pairs[0][1]]
    sampling = {"temperature": 1.0, "seed": seed}
    text_ids = pipeline.tokenize(captions).repeat_interleave(4, dim=0)
    guided_1 = generate(pipeline.model, text_ids, guidance_scale=1.0, **sampling)
    plain = generate(pipeline.model, text_ids, **sampling)
    guided_0 = generate(pipeline.model, text_ids, guidance_scale=0.0, **sampling)
    empty = generate(pipeline.model, empty_text_ids(pipeline.model.config, len(text_ids)), **sampling)
    return {"scale_1_guided_equals_plain": bool(torch.equal(guided_1, plain)),
            "scale_0_guided_vs_empty_caption_same_codes": round(float((guided_0 == empty).double().mean()), 4),
            "images": len(text_ids)}


def table(report: dict) -> str:
    def pct(entry):
        return "-" if entry["rate"] is None else f"{entry['rate']:.0%}"

    def attr(value):
        return "-" if value is None else f"{value:.0%}"

    samples = report["settings"]["samples_per_caption"]
    lines = [f"| split | T | s | full match [95% CI] | 1 obj | 2 obj | any of {samples} | colour | shape | size "
             f"| relation | count | blank | extra | distinct grids /{samples} | codes differ | pixel Δ "
             "| ms/image |", "|" + " --- |" * 18]
    for label, rows in report["results"].items():
        for row in rows:
            full, a, d = row["full_match"], row["attributes"], row["diversity_per_caption"]
            lines.append(
                f"| {label} | {row['temperature']:g} | {row['guidance_scale']:g} | {full['rate']:.1%} "
                f"[{full['ci95'][0]:.0%}, {full['ci95'][1]:.0%}] | {pct(row['full_match_one_object'])} "
                f"| {pct(row['full_match_two_objects'])} | {pct(row[f'captions_with_a_match_among_{samples}'])} "
                f"| {attr(a['colour_accuracy'])} | {attr(a['shape_accuracy'])} | {attr(a['size_accuracy'])} "
                f"| {attr(a['relation_accuracy'])} | {attr(a['count_accuracy'])} | {pct(row['blank'])} "
                f"| {pct(row['extra_objects'])} | {d['distinct_grids']:.2f} | {d['mean_pairwise_code_difference']:.0%} "
                f"| {d['mean_pairwise_abs_pixel']:.3f} | {row['sampling_s_per_image'] * 1000:.0f} |")
    lines.append(f"\n{report['settings']['captions_per_split']} captions per split x {samples} samples, "
                 f"every sample scored (N = 1); wall {report['wall_seconds']:.0f} s")
    return "\n".join(lines)


def merge_reports(reports: list[dict]) -> dict:
    """One report from one-split reports of the same settings."""
    settings = shared_settings(reports)
    merged = {**reports[0], "settings": {**settings, "split": "both"}, "results": {},
              "wall_seconds": round(sum(r["wall_seconds"] for r in reports), 1)}
    for report in reports:
        merged["results"].update(report["results"])
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=40, help="captions per split")
    parser.add_argument("--samples", type=int, default=8, help="samples per caption")
    parser.add_argument("--chunk", type=int, default=10, help="captions per generate() call (the seeds depend on it)")
    parser.add_argument("--seed", type=int, default=7, help="7: the first captions of benchmarks/composition.py")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 test-split caption x 2 samples, scales 0 1 2, temperature 0.8")
    parser.add_argument("--out", default=None, help=f"the JSON to write (default: {RESULTS}; --quick: none)")
    parser.add_argument("--split", choices=("both", "test", "heldout"), default="both")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="join one-split result files into --out and stop")
    args = parser.parse_args()
    out = args.out or (None if args.quick else str(RESULTS))
    if args.merge:
        report = merge_reports([json.loads(Path(name).read_text()) for name in args.merge])
        Path(out or RESULTS).write_text(json.dumps(report, indent=2) + "\n")
        print(table(report))
        return
    scales, temperatures = SCALES, TEMPERATURES
    if args.quick:
        args.captions, args.samples, args.chunk = 1, 2, 1
        scales, temperatures = (0.0, 1.0, 2.0), TEMPERATURES[:1]
        args.split = "test" if args.split == "both" else args.split
    if args.samples < 2:
        parser.error("--samples must be at least 2 (diversity compares the samples of one caption)")
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    load_before = os.getloadavg()[0]
    pipeline = Pipeline.load()
    results, checks = {}, None
    for label, split in SPLITS:
        if args.split not in ("both", split):
            continue
        pairs = split_captions(split, args.captions, args.seed)
        checks = checks or equivalence_checks(pipeline, pairs, args.seed)
        rows = []
        for temperature, scale in tqdm(list(itertools.product(temperatures, scales)), desc=f"{split} settings"):
            row = run_config(pipeline, pairs, args.samples, scale, temperature, args.seed, args.chunk)
            rows.append({"temperature": temperature, "guidance_scale": scale, **row})
        results[label] = rows
    report = {
        **report_header("guidance", args.threads),
        "settings": {"captions_per_split": args.captions, "samples_per_caption": args.samples,
                     "images_per_row": args.captions * args.samples, "seed": args.seed, "chunk": args.chunk,
                     "generation_seed": "seed * 100003 + index of the chunk's first caption, the same for every "
                                        "scale and temperature (common random numbers)",
                     "scales": list(scales), "temperatures": list(temperatures), "top_k": None, "top_p": None,
                     "cli_default": SAMPLING_DEFAULTS, "split": args.split, "quick": args.quick,
                     "captions": "benchmarks/composition.py split_captions(split, captions, seed): the first "
                                 "captions of composition.json's sets",
                     "checkpoints": {"dalle": "shipped (data/dalle_tiny.safetensors, caption dropout 0.1)",
                                     "dvae": "shipped", "tokenizer": "shipped"}},
        "guidance_scale_meaning": SCALE_MEANING,
        "checks": checks,
        "units": "rates are fractions of images (every sample scored, N = 1) with a 95% Wilson interval (ci95) "
                 "that treats the images as independent: the samples of one caption are not, so the interval is "
                 "optimistic; captions_with_a_match_among_S is per caption. attributes: evaluate.summarize "
                 "(colour/shape/size per object of the caption, relation per two-object caption, count per image). "
                 "blank: no object detected; extra_objects: more objects detected than the caption has. "
                 "diversity_per_caption: among the S samples of one caption, averaged over captions; pixel "
                 "distances with pixels in [0, 1] on 3x32x32 images. sampling_s_per_image includes dVAE decoding.",
        "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "results": results,
    }
    report["wall_seconds"] = round(time.perf_counter() - began, 1)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    print(table(report))
    print(f"checks: {checks}")


if __name__ == "__main__":
    main()
