"""DiMR class conditioning in miniature: does a dimr-tiny model draw the digit it is asked for?

1. Train `dimr-tiny` (DiMR's own recipe: multi-scale ε loss, TD norms, label dropout 0.1) on
   builtin:digits (scikit-learn's 1797 digits, 16×16, labels 0..9) with the one training loop,
   on one CPU thread, for a budget of CPU time spent in training steps (the machine is shared).
2. Train a simple classifier on the real digits at the same resolution (logistic regression on the
   grey pixels), checked on held-out real digits.
3. Sample `--per-class` images of every class (the same seeds for every guidance scale) with the
   DPM-Solver++(2M) sampler, without guidance (scale 1) and with guidance (scales w), and report how
   often the classifier names the requested class (target: >= 80% at the first w).

    python -m benchmarks.dimr_class_conditioning [--minutes 14] [--guidance 4 2] [--per-class 30] [--out-dir DIR]

Writes DIR/dimr_class_conditioning.json and .png (sample grids per guidance, accuracy per class).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_info, save_figure, write_results
from patchdiffusion import run as runs
from patchdiffusion.config import RunConfig, apply_overrides
from patchdiffusion.rng import SampleRNG, mix_seed

RESOLUTION = 16
TRAIN = [  # a CPU-sized version of the reference's optimiser (its betas 0.99/0.99 and 5k warm-up suit batch 1024)
    "data.source=builtin:digits", f"data.resolution={RESOLUTION}", "data.use_labels=true", "data.hflip=false",
    "train.batch_size=32", "train.lr=2e-3", "train.betas=[0.9,0.99]", "train.weight_decay=0.03",
    "train.warmup_steps=50", "train.ema_halflife_kimg=2", "train.ema_rampup=0.2", "train.sample_images=20",
    "train.log_every=20", "train.checkpoint_every=500", "train.device=cpu",
]


def real_digits() -> tuple[np.ndarray, np.ndarray]:
    """All builtin digits at RESOLUTION as grey values in [0, 1], (N, H·W), and their labels."""
    from patchdiffusion.data import ImageDataset, open_source

    size = (RESOLUTION, RESOLUTION)
    dataset = ImageDataset(open_source("builtin:digits", resolution=size), resolution=size, use_labels=True)
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return grey(torch.stack(images)), np.array(labels)


def grey(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H·W) grey values in [0, 1]."""
    return ((images.float().mean(1).clamp(-1, 1) + 1) / 2).flatten(1).cpu().numpy()


def fit_classifier(x: np.ndarray, y: np.ndarray, seed: int = 0):
    """Logistic regression on 80% of the real digits; returns (classifier, held-out accuracy)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    classifier = LogisticRegression(max_iter=3000, C=1.0).fit(x_train, y_train)
    return classifier, float(classifier.score(x_test, y_test))


def generate(method, net, per_class: int, guidance: float, steps: int) -> tuple[torch.Tensor, np.ndarray]:
    """per_class images of each class 0..9, image (c, i) seeded by (c, i) alone."""
    images, labels = [], []
    for c in range(10):
        rng = SampleRNG([mix_seed(7, c, i) for i in range(per_class)])
        wanted = torch.full((per_class,), c, dtype=torch.long)
        images.append(method.sample(net, rng, labels=wanted, steps=steps, guidance=guidance))
        labels.append(wanted.numpy())
    return torch.cat(images), np.concatenate(labels)


def run(minutes: float, guidance: list[float], per_class: int, steps: int, out_dir: str, run_dir: str,
        reuse: bool, command: str) -> dict:
    from patchdiffusion.run import load_run
    from patchdiffusion.train import train

    torch.set_num_threads(1)  # the machine is shared
    run_path = Path(run_dir)
    train_seconds = None
    if not (reuse and (run_path / "config.yaml").is_file()):
        config = apply_overrides(RunConfig(), ["method=dimr"])
        config = apply_overrides(config, TRAIN + ["train.steps=100000", f"train.max_cpu_minutes={minutes}"])
        start = time.time()
        train(config, run_path, progress=False)
        train_seconds = time.time() - start
    loaded = load_run(run_path)
    metrics = [r for r in runs.read_metrics(run_path) if "loss" in r]
    x, y = real_digits()
    classifier, real_accuracy = fit_classifier(x, y)

    results, grids = {}, {}
    for scale in [1.0] + [g for g in guidance if g != 1.0]:
        start = time.time()
        images, wanted = generate(loaded.method, loaded.net, per_class, scale, steps)
        predicted = classifier.predict(grey(images))
        per = {str(c): float((predicted[wanted == c] == c).mean()) for c in range(10)}
        results[f"{scale:g}"] = dict(
            guidance=scale, accuracy=float((predicted == wanted).mean()), per_class=per,
            confusion=[[int(((wanted == a) & (predicted == b)).sum()) for b in range(10)] for a in range(10)],
            sample_seconds=time.time() - start,
        )
        grids[f"{scale:g}"] = images.view(10, per_class, *images.shape[1:])[:, : min(per_class, 12)]
        print(f"guidance {scale:g}: {results[f'{scale:g}']['accuracy'] * 100:.1f}% of {len(wanted)} samples "
              f"classified as the requested digit")

    report = dict(
        benchmark="dimr_class_conditioning",
        command=command,
        machine=machine_info(torch.device("cpu")),
        note="CPU shared with other jobs; one torch thread; the budget is CPU time spent in training steps.",
        config=dict(resolution=RESOLUTION, train=TRAIN, minutes=minutes, per_class=per_class, steps=steps,
                    sampler=loaded.method.default_sampler, model="dimr-tiny",
                    parameters=sum(p.numel() for p in loaded.net.parameters())),
        training=dict(steps=loaded.checkpoint.step, images_seen=metrics[-1]["images_seen"] if metrics else None,
                      wall_seconds=train_seconds, final_loss=metrics[-1]["loss"] if metrics else None,
                      cpu_seconds=metrics[-1].get("cpu_seconds") if metrics else None),
        classifier=dict(kind="sklearn LogisticRegression on 16×16 grey pixels, 80/20 split of the real digits",
                        held_out_real_accuracy=real_accuracy),
        results=results,
    )
    write_results(report, out_dir, "dimr_class_conditioning", torch.device("cpu"), lambda r, p: plot(r, p, grids))
    return report


def plot(report: dict, path: str, grids: dict[str, torch.Tensor]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from patchdiffusion.images import grid, to_uint8

    scales = list(report["results"])
    fig, axes = plt.subplots(1, len(scales) + 1, figsize=(5.2 * (len(scales) + 1), 5.2))
    for ax, scale in zip(axes, scales):
        images = grids[scale]  # (10, n, C, H, W)
        picture = grid(to_uint8(images.flatten(0, 1)), columns=images.shape[1])
        ax.imshow(picture, interpolation="nearest")
        ax.set_yticks([(i + 0.5) * picture.shape[0] / 10 for i in range(10)], [str(i) for i in range(10)])
        ax.set_xticks([])
        r = report["results"][scale]
        ax.set_title(f"guidance {scale}: {r['accuracy'] * 100:.1f}% classified as asked", fontsize=10)
        ax.set_ylabel("requested digit")
    ax = axes[-1]
    for k, scale in enumerate(scales):
        per = report["results"][scale]["per_class"]
        width = 0.8 / len(scales)
        ax.bar([c + (k - (len(scales) - 1) / 2) * width for c in range(10)], [per[str(c)] * 100 for c in range(10)], width,
               label=f"guidance {scale}")
    ax.axhline(80, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(10))
    ax.set_xlabel("requested digit")
    ax.set_ylabel("% of samples the classifier labels as requested")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, loc="lower right")
    t = report["training"]
    ax.set_title(f"classifier: {report['classifier']['held_out_real_accuracy'] * 100:.1f}% on held-out real digits",
                 fontsize=10)
    fig.suptitle(f"dimr-tiny on builtin:digits {RESOLUTION}², {t['steps']} steps × batch 32 "
                 f"({report['config']['parameters'] / 1e6:.2f}M parameters, CPU, 1 thread); "
                 f"{report['config']['steps']} DPM-Solver++(2M) steps", fontsize=11)
    save_figure(fig, path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="patchdiff bench dimr-class-conditioning", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=14.0, help="training budget (CPU minutes in training steps)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[4.0, 2.0],
                        help="guidance scales compared with 1 (none); the first is held to the 80%% target")
    parser.add_argument("--per-class", type=int, default=30, help="samples per class and guidance scale")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps")
    parser.add_argument("--run-dir", default="runs/bench-dimr-digits", help="where the model is trained")
    parser.add_argument("--reuse", action="store_true", help="sample from an existing --run-dir instead of training")
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.dimr_class_conditioning " + " ".join(sys.argv[1:] if argv is None else argv)
    report = run(args.minutes, args.guidance, args.per_class, args.steps, args.out_dir, args.run_dir, args.reuse,
                 command.strip())
    target = report["results"][f"{args.guidance[0]:g}"]["accuracy"]
    print(f"with guidance {args.guidance[0]:g}: {target * 100:.1f}% (target >= 80%); without: "
          f"{report['results']['1']['accuracy'] * 100:.1f}%; classifier on real digits "
          f"{report['classifier']['held_out_real_accuracy'] * 100:.1f}%")
    return 0 if target >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
