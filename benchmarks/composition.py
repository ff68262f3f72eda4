"""Does the picture match the caption? The course pipeline measured with the course scorer.

For a fixed, seeded set of captions from the training distribution (the test split: the
same attribute mix as training, other scenes) and from the held-out split (shape-colour
pairs never seen in training), draw 64 candidates per caption and score every one with
``dalle_lesson.evaluate``. Then, for N = 1, 4, 16 and 64 (the first N candidates):

* ``one sample`` (N = 1) and ``CLIP best of N``: the candidate the course CLIP ranks first;
* ``oracle best of N``: any of the N fully matches (what a perfect reranker would get);
* ``dVAE round trip``: the true scene rendered, encoded and decoded by the dVAE, then
  scored (the ceiling for any transformer that draws through this dVAE).

Each rate comes with a 95 % Wilson interval; one- and two-object captions are reported
apart. Timing: seconds per image for sampling (with decoding) and for CLIP scoring.

    python benchmarks/composition.py                 # 200 captions per split, the pipeline's default sampling
    python benchmarks/composition.py --captions 20   # a quick look
    python benchmarks/composition.py --temperature 1 --top-k none --guidance none   # plain sampling

``--model`` / ``--dvae`` score other checkpoints (default: the shipped ones); the sampling
settings default to ``dalle_lesson.pipeline.SAMPLING_DEFAULTS``, those of the CLI.

Writes benchmarks/results/composition.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dalle_lesson import evaluate
from dalle_lesson.clip import clip_scores, load_clip
from dalle_lesson.data import Scene, ShapesDataset, pil_to_tensor, render_scene
from dalle_lesson.cli import add_sampling_arguments, sampling_options
from dalle_lesson.pipeline import Pipeline

CANDIDATE_COUNTS = (1, 4, 16, 64)
RESULTS = Path(__file__).parent / "results" / "composition.json"
SPLITS = (("training distribution", "test"), ("held-out combinations", "heldout"))  # (label, ShapesDataset split)


def wilson(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a rate (better than p ± 2 sd near 0 and 1)."""
    if total == 0:
        return (float("nan"), float("nan"))
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (round(centre - half, 4), round(centre + half, 4))


def percent(entry: dict) -> str:
    """A :func:`rate` as a percentage; "-" for an empty group (a quick run may have no two-object caption)."""
    return "-" if entry["rate"] is None else f"{entry['rate']:.0%}"


def rate(flags: list[bool]) -> dict:
    return {"rate": round(sum(flags) / len(flags), 4) if flags else None, "n": len(flags),
            "ci95": wilson(sum(flags), len(flags))}


ATTRIBUTES = ("colour", "shape", "size", "relation", "count")


def one_picture_rates(images, captions: list[str]) -> dict:
    """Full-match and per-attribute rates of one picture per caption (the scorable captions)."""
    judged = [s for s in evaluate.score_batch(images, captions) if s.scorable]
    flags = [attribute_flags(s) for s in judged]
    out = {"captions": len(judged), "full_match": rate([bool(s.full_match) for s in judged])}
    for attribute in ATTRIBUTES:
        out[attribute] = rate([f[attribute] for f in flags if f[attribute] is not None])
    return out


def split_captions(split: str, count: int, seed: int) -> list[tuple[Scene, str]]:
    """The seeded (scene, caption) pairs of ``split`` that the benchmarks score."""
    dataset = ShapesDataset(length=count, image_size=32, split=split, seed=seed)
    return [(dataset.scene(i), dataset.caption(i)) for i in range(count)]


def benchmark_split(pipeline: Pipeline, clip, split: str, count: int, seed: int, max_n: int, timing: dict,
                    sampling: dict | None = None) -> list[dict]:
    """Score every candidate of ``count`` captions of ``split``; return the per-caption records.
    ``sampling``: the options of :func:`dalle_lesson.sampling.generate` (temperature, top_k, ...)."""
    records = []
    for i, (scene, caption) in enumerate(tqdm(split_captions(split, count, seed), desc=f"{split} captions")):
        start = time.perf_counter()
        generation = pipeline(caption, num_images=max_n, seed=seed * 100_003 + i, **(sampling or {}))
        timing["sampling_s"] += time.perf_counter() - start
        start = time.perf_counter()
        scores = clip_scores(clip, generation.images, caption)  # [max_n]
        timing["clip_s"] += time.perf_counter() - start
        timing["images"] += max_n
        judged = evaluate.score_batch(generation.images, [caption] * max_n)
        truth = pil_to_tensor(render_scene(scene, 32))[None]
        round_trip = pipeline.dvae.decode(pipeline.dvae.encode(truth))[0]
        records.append({
            "caption": caption, "objects": len(scene.objects), "clip_scores": scores.tolist(),
            "full_match": [bool(s.full_match) for s in judged], "scorable": judged[0].scorable,
            "attributes": [attribute_flags(s) for s in judged],
            "dvae_round_trip": bool(evaluate.score(round_trip, caption).full_match),
        })
    return records


def attribute_flags(score) -> dict:
    objects = score.objects
    return {"colour": all(o.colour for o in objects), "shape": all(o.shape for o in objects),
            "size": all(o.size for o in objects), "relation": score.relation, "count": score.count}


def summarize(records: list[dict], counts: tuple[int, ...] = CANDIDATE_COUNTS) -> dict:
    """Rates for N = 1, 4, 16, 64: CLIP's pick, the oracle, and the dVAE ceiling."""
    records = [r for r in records if r["scorable"]]
    out = {"captions": len(records), "dvae_round_trip": rate([r["dvae_round_trip"] for r in records])}
    for n in counts:
        picks = [max(range(n), key=lambda k: r["clip_scores"][k]) for r in records]
        out[f"clip_best_of_{n}"] = rate([r["full_match"][k] for r, k in zip(records, picks)])
        out[f"oracle_best_of_{n}"] = rate([any(r["full_match"][:n]) for r in records])
        if n in (1, 16):
            for attribute in ("colour", "shape", "size", "relation", "count"):
                flags = [r["attributes"][k][attribute] for r, k in zip(records, picks)]
                out[f"clip_best_of_{n}_{attribute}"] = rate([f for f in flags if f is not None])
    return out


def summarize_groups(records: list[dict], counts: tuple[int, ...] = CANDIDATE_COUNTS) -> dict:
    """:func:`summarize` of all captions, of the one-object and of the two-object ones."""
    return {"all": summarize(records, counts),
            "one object": summarize([r for r in records if r["objects"] == 1], counts),
            "two objects": summarize([r for r in records if r["objects"] == 2], counts)}


def write_report(report: dict, out: Path, table: str) -> None:
    """Write a results file (JSON) and print its table and where it went."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table)
    print(f"\nwrote {out} ({report['wall_time_s']:.0f} s)")


def report_header(benchmark: str, threads: int) -> dict:
    """What every results file starts with: the benchmark, when, torch, the machine."""
    return {"benchmark": benchmark, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch_version": torch.__version__,
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": threads}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=200, help="captions per split")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--candidates", type=int, default=max(CANDIDATE_COUNTS), choices=CANDIDATE_COUNTS,
                        help="the largest N (fewer candidates: a quicker run, the smaller Ns only)")
    parser.add_argument("--model", default=None, help="a DALL·E checkpoint (default: the shipped one)")
    parser.add_argument("--dvae", default=None, help="its dVAE (default: the shipped one)")
    parser.add_argument("--split", choices=("both", "test", "heldout"), default="both",
                        help="score one split only (two processes of one thread each run faster on a busy machine "
                             "than one of two threads; --merge joins their files)")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="join one-split result files into --out and stop")
    add_sampling_arguments(parser)
    args = parser.parse_args()
    if args.merge:
        report = merge_reports([json.loads(Path(name).read_text()) for name in args.merge])
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(table(report))
        return
    torch.set_num_threads(args.threads)
    pipeline, clip = Pipeline.load(model_path=args.model, dvae_path=args.dvae), load_clip()
    sampling = sampling_options(args)
    max_n = args.candidates
    counts = tuple(n for n in CANDIDATE_COUNTS if n <= max_n)
    timing = {"sampling_s": 0.0, "clip_s": 0.0, "images": 0}
    results = {}
    for label, split in SPLITS:
        if args.split not in ("both", split):
            continue
        records = benchmark_split(pipeline, clip, split, args.captions, args.seed, max_n, timing, sampling)
        results[label] = summarize_groups(records, counts)
    report = {
        **report_header("composition", args.threads),
        "settings": {"captions_per_split": args.captions, "seed": args.seed, "candidates": max_n, "split": args.split,
                     "sampling": sampling,
                     "checkpoints": {"dalle": args.model or "shipped", "dvae": args.dvae or "shipped",
                                     "tokenizer": "shipped", "clip": "shipped"}},
        "units": "rates are fractions of captions whose chosen picture fully matches (every object's colour, "
                 "shape, size, the relation, no extra object); ci95 = 95% Wilson interval",
        "sampling_s_per_image": round(timing["sampling_s"] / timing["images"], 5),
        "clip_rerank_s_per_image": round(timing["clip_s"] / timing["images"], 5),
        "results": results,
    }
    report["rerank_over_sampling_time"] = round(report["clip_rerank_s_per_image"] / report["sampling_s_per_image"], 4)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))


def shared_settings(reports: list[dict]) -> dict:
    """The settings (all but the split) that one-split reports share; refuse reports that differ."""
    def settings_of(report):
        return {key: value for key, value in report["settings"].items() if key != "split"}

    settings = settings_of(reports[0])
    for other in reports[1:]:
        if settings_of(other) != settings:
            raise ValueError(f"these reports were made with different settings: {settings} and {settings_of(other)}")
    return settings


def merge_reports(reports: list[dict]) -> dict:
    """One report from one-split reports of the same settings; timings averaged per image."""
    settings = shared_settings(reports)
    merged = {**reports[0], "settings": {**settings, "split": "both"}, "results": {}}
    for report in reports:
        merged["results"].update(report["results"])
    for key in ("sampling_s_per_image", "clip_rerank_s_per_image"):
        merged[key] = round(sum(r[key] for r in reports) / len(reports), 5)
    merged["rerank_over_sampling_time"] = round(merged["clip_rerank_s_per_image"] / merged["sampling_s_per_image"], 4)
    return merged


def table(report: dict) -> str:
    def cell(entry):
        return f"{entry['rate']:.0%} [{entry['ci95'][0]:.0%}, {entry['ci95'][1]:.0%}]" if entry["rate"] is not None else "-"

    counts = [n for n in CANDIDATE_COUNTS if n <= report["settings"]["candidates"]]
    lines = ["| captions | group | " + " | ".join(f"CLIP best of {n} (oracle)" for n in counts)
             + " | dVAE round trip |", "|" + " --- |" * (3 + len(counts))]
    for label, groups in report["results"].items():
        for group, s in groups.items():
            cells = [f"{cell(s[f'clip_best_of_{n}'])} ({s[f'oracle_best_of_{n}']['rate']:.0%})" for n in counts]
            lines.append(f"| {label} | {group} (n={s['captions']}) | " + " | ".join(cells)
                         + f" | {cell(s['dvae_round_trip'])} |")
    lines.append(f"\nsampling {report['sampling_s_per_image'] * 1000:.1f} ms/image, CLIP scoring "
                 f"{report['clip_rerank_s_per_image'] * 1000:.2f} ms/image "
                 f"({report['rerank_over_sampling_time']:.1%} of sampling)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
