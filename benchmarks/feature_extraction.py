"""How fast can images be evaluated here? Inception feature extraction, and the weight-free metrics, in images/s.

Inception cases run the full `patchdiff eval` input path on uint8 images (64x64, the size of the
built-in sets): resize to 299x299, the 2015-12-05 Inception-v3, pool3 features plus the IS class
probabilities. The network is randomly initialised (no weights can be downloaded here); the
arithmetic is the same as with the real weights. Cases differ in batch size and memory layout
(channels_last lets oneDNN / cuDNN choose other convolution kernels). Every repeat visits every case
in a rotating order and the median is reported, as wall time and as this process's CPU time (the
latter is less sensitive to other programs on the same cores). For context the weight-free metrics
are timed too: SWD descriptor collection plus the distance (1,000 vs 1,000 images) and the seam score.

    python -m benchmarks.feature_extraction [--device cuda] [--repeats 3] [--out-dir DIR]
    patchdiff bench feature-extraction [...]

Writes DIR/feature_extraction.json and .png (DIR/feature_extraction.<device>.* off CPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from benchmarks.common import machine_info, write_results

from patchdiffusion.eval.detectors import random_inception_detector
from patchdiffusion.eval.features import FeatureCollector
from patchdiffusion.eval.seam import seam_score
from patchdiffusion.eval.swd import sliced_wasserstein_distance

IMAGE_SIDE = 64  # evaluated image size; the pipeline resizes to 299 either way
SWD_IMAGES = 1000


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def inception_cases(device: torch.device) -> dict[str, dict]:
    """name -> (batch size, channels_last, images per timed run)."""
    if device.type == "cuda":
        batches, per_run = (64, 256), 512
    else:  # ~4 images/s on 2 busy cores: keep the whole benchmark near a minute and a half
        batches, per_run = (4, 16), 16
    cases = {}
    for batch in batches:
        for channels_last in (True, False):
            layout = "channels_last" if channels_last else "contiguous"
            cases[f"batch {batch}, {layout}"] = dict(batch=batch, channels_last=channels_last, images=per_run)
    return cases


def time_inception(device: torch.device, repeats: int) -> dict:
    cases = inception_cases(device)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (max(c["images"] for c in cases.values()), 3, IMAGE_SIDE, IMAGE_SIDE),
                           dtype=torch.uint8, generator=generator)
    detectors = {}
    for name, case in cases.items():
        detector = random_inception_detector(seed=0)
        if not case["channels_last"]:
            detector = type(detector)(detector.net, detector.path, channels_last=False)
        detectors[name] = detector.to(device)
        case.update(times_s=[], cpu_times_s=[])

    def run_case(name: str, count: int) -> None:
        batch = cases[name]["batch"]
        collector = FeatureCollector(detectors[name], device, with_class_probs=True)
        for start in range(0, count, batch):
            collector.add(images[start:start + batch])
        assert collector.result().features.shape == (count, 2048)

    names = list(cases)
    for name in names:  # warm-up, one batch each: oneDNN / cuDNN choose their kernels on the first call
        run_case(name, cases[name]["batch"])
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            run_case(name, cases[name]["images"])
            sync(device)
            cases[name]["times_s"].append(time.perf_counter() - start)
            cases[name]["cpu_times_s"].append(time.process_time() - cpu_start)
    for case in cases.values():
        case["median_s"] = statistics.median(case["times_s"])
        case["images_per_s"] = case["images"] / case["median_s"]
        case["cpu_s_per_image"] = statistics.median(case["cpu_times_s"]) / case["images"]
    return cases


def time_weight_free(repeats: int) -> dict:
    """SWD (1,000 vs 1,000 images at 64x64) and the seam score, on CPU: what in-training monitoring costs."""
    from patchdiffusion.data import open_source

    source = open_source(f"builtin:photos?count={SWD_IMAGES}", resolution=IMAGE_SIDE)
    import numpy as np

    first = torch.from_numpy(np.stack([source.read(i) for i in range(SWD_IMAGES)])).permute(0, 3, 1, 2).contiguous()
    second = first.flip(-1)  # mirrored: a different set with the same statistics
    swd_times, seam_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        sliced_wasserstein_distance(first, second)
        swd_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        seam_score(first, 16)
        seam_times.append(time.perf_counter() - start)
    swd_s, seam_s = statistics.median(swd_times), statistics.median(seam_times)
    return {
        f"SWD, {SWD_IMAGES} vs {SWD_IMAGES} images": dict(images=2 * SWD_IMAGES, times_s=swd_times, median_s=swd_s,
                                                          images_per_s=2 * SWD_IMAGES / swd_s),
        f"seam score, {SWD_IMAGES} images": dict(images=SWD_IMAGES, times_s=seam_times, median_s=seam_s,
                                                 images_per_s=SWD_IMAGES / seam_s),
    }


def run(device: str = "cpu", repeats: int = 3, out_dir: str = "benchmarks/results", command: str | None = None) -> dict:
    dev = torch.device(device)
    started = time.perf_counter()
    report = dict(
        benchmark="feature_extraction",
        command=command or "python -m benchmarks.feature_extraction " + " ".join(sys.argv[1:]),
        machine=machine_info(dev),
        image_side=IMAGE_SIDE,
        weights="random (same arithmetic as the 2015-12-05 weights)",
        repeats=repeats,
        inception=time_inception(dev, repeats),
        weight_free=time_weight_free(repeats=1),  # seconds-long and steady; one run is enough
    )
    best = max(report["inception"].values(), key=lambda case: case["images_per_s"])
    report["summary"] = dict(
        best_inception_images_per_s=best["images_per_s"],
        best_inception_case=next(n for n, c in report["inception"].items() if c is best),
        minutes_for_50k_images_at_best=50000 / best["images_per_s"] / 60,
        seconds_total=time.perf_counter() - started,
    )
    write_results(report, out_dir, "feature_extraction", dev, plot)
    return report


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("inception", "Inception-v3 features + IS probabilities\n(uint8 64x64 -> 299x299), images/s"),
              ("weight_free", "weight-free metrics (CPU), images/s")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), gridspec_kw=dict(width_ratios=[2, 1]))
    for ax, (kind, title) in zip(axes, panels):
        cases = report[kind]
        names = list(cases)
        rates = [cases[n]["images_per_s"] for n in names]
        bars = ax.bar(range(len(names)), rates, color="tab:blue" if kind == "inception" else "tab:green")
        for i, name in enumerate(names):  # every repeat as a dot
            ax.plot([i] * len(cases[name]["times_s"]), [cases[name]["images"] / t for t in cases[name]["times_s"]],
                    "k.", ms=4)
        ax.bar_label(bars, fmt="%.3g", fontsize=9)
        ax.set_xticks(range(len(names)), [n.replace(", ", "\n") for n in names], fontsize=8)
        ax.set_title(title, fontsize=10)
        if kind == "weight_free":
            ax.set_yscale("log")  # SWD and the seam score differ by ~30x
        ax.margins(y=0.18)
    m, s = report["machine"], report["summary"]
    hardware = f" ({m['gpu']})" if "gpu" in m else f", {m['cpu_count']} CPU cores, {m['torch_threads']} threads"
    where = m["device"] + hardware
    load = f", load avg {m['load_average_1min']:.1f}" if "load_average_1min" in m else ""
    fig.suptitle(
        f"Evaluation throughput on {where}{load}; torch {m['torch']}\n"
        f"best Inception: {s['best_inception_images_per_s']:.3g} images/s ({s['best_inception_case']}): "
        f"FID@50k needs ~{s['minutes_for_50k_images_at_best']:.0f} min of feature extraction",
        fontsize=10,
    )
    footer = f"$ {report['command']}   ({report['weights']}; Inception: median of {report['repeats']} repeats)"
    fig.text(0.01, 0.01, footer,
             fontsize=7, family="monospace")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="patchdiff bench feature-extraction", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per case (median reported)")
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.feature_extraction " + " ".join(sys.argv[1:] if argv is None else argv)
    report = run(args.device, args.repeats, args.out_dir, command.strip())
    for group in ("inception", "weight_free"):
        for name, case in report[group].items():
            extra = f"  {case['cpu_s_per_image'] * 1e3:7.1f} ms CPU/image" if "cpu_s_per_image" in case else ""
            print(f"{name:34s} {case['images_per_s']:9.2f} images/s{extra}")
    s = report["summary"]
    print(f"best Inception case: {s['best_inception_case']} -> {s['best_inception_images_per_s']:.2f} images/s; "
          f"50k images ~{s['minutes_for_50k_images_at_best']:.0f} min ({s['seconds_total']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    main()
