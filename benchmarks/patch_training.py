"""Patch Diffusion's training throughput, measured: patch training (real_p=0.5) vs full-image training.

The same U-Net widths (patch training's net has 2 more input channels, the coordinates) train on
built-in 64x64 images with the real training step of each method (its `loss`, backward, AdamW), side
by side in one process:
  * per patch size: one training step of each case in rotating order, repeated; medians give the
    time of a full-image step and of patch steps at 16² (×4 images), 32² (×2) and 64² (×1), and the
    expected patch step time Σ P(size)·t(size);
  * drawn: a sequence of training steps, one patch step then one full step, alternating, so both
    see the same load on the host. The patch sizes come in shuffled decks of 10 steps holding the
    sizes in their exact proportions (2×16², 3×32², 5×64² at real_p=0.5), so a short run is not
    skewed by the luck of the draw (training itself draws each step independently).
Throughput is reported as steps/s (batch B), samples/s (images drawn per second: B·multiplier per
patch step), images counted/s (B·E[multiplier], the images-seen clock of the reference code) and
pixels/s (pixels fed to the network), with wall time and this process's CPU time.

Pixel counting predicts, at real_p=0.5 and R=64: a patch step processes 0.2·4/16 + 0.3·2/4 + 0.5 = 0.7
of a full step's pixels, so 1/0.7 ≈ 1.43× steps/s, 1.9/0.7 ≈ 2.7× samples/s and 1.0× pixels/s.

    python -m benchmarks.patch_training [--seconds 100] [--batch 8] [--out-dir DIR]

Writes DIR/patch_training.json and DIR/patch_training.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from benchmarks.common import machine_info, save_figure, write_results
from patchdiffusion.methods.base import StepPlan, TrainBatch
from patchdiffusion.methods.full import FullConfig, FullImageMethod
from patchdiffusion.methods.patch_diffusion import PatchDiffusionConfig, PatchDiffusionMethod, batch_multiplier
from patchdiffusion.nets.unet import UNetConfig
from patchdiffusion.rng import SampleRNG, mix_seed

RESOLUTION = 64
NET = dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(16,), head_channels=32)
DECK = 10  # steps per deck in the drawn phase


def load_images(count: int) -> torch.Tensor:
    from patchdiffusion.data import ImageDataset, open_source

    size = (RESOLUTION, RESOLUTION)
    dataset = ImageDataset(open_source("builtin:textures", resolution=size), resolution=size)
    return torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])


class Case:
    """One method's net + optimizer, and its training step on a batch drawn from `images`."""

    def __init__(self, method, images: torch.Tensor, batch: int):
        self.method, self.images, self.batch = method, images, batch
        torch.manual_seed(0)
        self.net = method.build_network()
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=1e-4)
        self.calls = 0

    def step(self, plan: StepPlan) -> tuple[float, float, int, int]:
        """One training step; returns (wall s, CPU s, samples, pixels fed to the net)."""
        count = self.batch * plan.multiplier
        g = torch.Generator().manual_seed(self.calls)
        index = torch.randint(0, len(self.images), (count,), generator=g)
        rng = SampleRNG([mix_seed(9, self.calls, k) for k in range(count)])
        self.calls += 1
        start, cpu_start = time.perf_counter(), time.process_time()
        images = self.images[index]
        loss = self.method.loss(self.net, TrainBatch(images, None, index, plan), rng).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        side = getattr(plan, "patch_size", 0) or RESOLUTION
        return time.perf_counter() - start, time.process_time() - cpu_start, count, count * side * side


def run(seconds: float = 100.0, batch: int = 8, real_p: float = 0.5, out_dir: str = "benchmarks/results",
        command: str | None = None) -> dict:
    images = load_images(256)
    full = Case(FullImageMethod(FullConfig(net=UNetConfig(**NET)), (RESOLUTION, RESOLUTION)), images, batch)
    patch_method = PatchDiffusionMethod(
        PatchDiffusionConfig(net=UNetConfig(**NET, extra_in_channels=2), real_p=real_p), (RESOLUTION, RESOLUTION)
    )
    patch = Case(patch_method, images, batch)
    sizes, probs = patch_method.patch_sizes, patch_method.patch_probabilities
    plans = {"full 64²": (full, StepPlan())}
    for s in sizes:
        m = batch_multiplier(s, RESOLUTION)
        plans[f"patch {s}² ×{m}"] = (patch, StepPlan(multiplier=m, options={"patch_size": s}))

    # Warm-up: every case twice.
    for case, plan in plans.values():
        for _ in range(2):
            case.step(plan)

    # Per patch size, interleaved in rotating order, for 40% of the budget.
    names = list(plans)
    per_size = {n: {"wall_s": [], "cpu_s": []} for n in names}
    start, r = time.perf_counter(), 0
    while time.perf_counter() - start < 0.4 * seconds or r < 3:
        for n in names[r % len(names):] + names[: r % len(names)]:
            wall, cpu, _, _ = plans[n][0].step(plans[n][1])
            per_size[n]["wall_s"].append(wall)
            per_size[n]["cpu_s"].append(cpu)
        r += 1
    for n, res in per_size.items():
        res["median_wall_s"] = statistics.median(res["wall_s"])
        res["median_cpu_s"] = statistics.median(res["cpu_s"])
        res["repeats"] = len(res["wall_s"])
    t_full = per_size[names[0]]
    expected = {
        key: sum(p * per_size[n][key] for p, n in zip(probs, names[1:])) for key in ("median_wall_s", "median_cpu_s")
    }
    avg_mul = patch_method.average_multiplier
    pixel_fraction = sum(p * batch_multiplier(s, RESOLUTION) * s * s for s, p in zip(sizes, probs)) / RESOLUTION**2
    stratified = {
        "full_step_s": t_full["median_wall_s"], "patch_step_expected_s": expected["median_wall_s"],
        "steps_per_s_ratio": t_full["median_wall_s"] / expected["median_wall_s"],
        "cpu_steps_per_s_ratio": t_full["median_cpu_s"] / expected["median_cpu_s"],
    }
    for key in ("steps_per_s_ratio", "cpu_steps_per_s_ratio"):
        stratified[key.replace("steps", "samples")] = stratified[key] * avg_mul
        stratified[key.replace("steps", "pixels")] = stratified[key] * pixel_fraction

    # Drawn: shuffled decks of patch sizes in exact proportion, alternating with full steps, whole decks
    # for the other 60%.
    deck = [s for s, p in zip(sizes, probs) for _ in range(round(p * DECK))]
    totals = {k: dict(steps=0, wall_s=0.0, cpu_s=0.0, samples=0, pixels=0, sizes={}) for k in ("patch", "full")}
    start, step, order = time.perf_counter(), 0, []
    while step % len(deck) or time.perf_counter() - start < 0.6 * seconds or step < len(deck):
        if not order:
            g = torch.Generator().manual_seed(step)
            order = [deck[i] for i in torch.randperm(len(deck), generator=g)]
        size = order.pop()
        plan = StepPlan(multiplier=batch_multiplier(size, RESOLUTION), options={"patch_size": size})
        for key, case, p in (("patch", patch, plan), ("full", full, StepPlan()))[:: 1 if step % 2 else -1]:
            wall, cpu, samples, pixels = case.step(p)
            t = totals[key]
            t["steps"] += 1
            t["wall_s"] += wall
            t["cpu_s"] += cpu
            t["samples"] += samples
            t["pixels"] += pixels
            if key == "patch":
                size = p.patch_size
                t["sizes"][str(size)] = t["sizes"].get(str(size), 0) + 1
        step += 1
    for key, t in totals.items():
        counted = t["steps"] * batch * (avg_mul if key == "patch" else 1.0)
        t.update(
            steps_per_s=t["steps"] / t["wall_s"], samples_per_s=t["samples"] / t["wall_s"],
            images_counted_per_s=counted / t["wall_s"], pixels_per_s=t["pixels"] / t["wall_s"],
            cpu_samples_per_s=t["samples"] / t["cpu_s"], cpu_pixels_per_s=t["pixels"] / t["cpu_s"],
            cpu_steps_per_s=t["steps"] / t["cpu_s"],
        )
    ratios = {
        k: totals["patch"][k] / totals["full"][k]
        for k in ("steps_per_s", "samples_per_s", "images_counted_per_s", "pixels_per_s",
                  "cpu_steps_per_s", "cpu_samples_per_s", "cpu_pixels_per_s")
    }
    report = dict(
        benchmark="patch_training",
        command=command or "python -m benchmarks.patch_training " + " ".join(sys.argv[1:]),
        machine=machine_info(torch.device("cpu")),
        config=dict(resolution=RESOLUTION, batch=batch, real_p=real_p, net={k: list(v) if isinstance(v, tuple) else v
                                                                             for k, v in NET.items()},
                    patch_sizes=sizes, probabilities=probs, average_multiplier=avg_mul, seconds=seconds),
        predicted_by_pixel_counting=dict(
            pixel_fraction_per_step=pixel_fraction, steps_per_s_ratio=1 / pixel_fraction,
            samples_per_s_ratio=avg_mul / pixel_fraction, pixels_per_s_ratio=1.0,
        ),
        per_size=per_size,
        stratified=stratified,
        drawn=dict(totals=totals, ratios_patch_over_full=ratios),
    )
    write_results(report, out_dir, "patch_training", torch.device("cpu"), plot)
    return report


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    per = report["per_size"]
    names = list(per)
    ax = axes[0]
    bars = ax.bar(range(len(names)), [per[n]["median_wall_s"] * 1e3 for n in names],
                  color=["tab:gray"] + ["tab:blue"] * (len(names) - 1))
    ax.bar_label(bars, fmt="%.0f", fontsize=9)
    for i, n in enumerate(names):
        ax.plot([i] * len(per[n]["wall_s"]), [t * 1e3 for t in per[n]["wall_s"]], "k.", ms=3, alpha=0.5)
    ax.set_xticks(range(len(names)), names, fontsize=9)
    ax.set_ylabel("ms per training step (median, dots: repeats)")
    ax.set_title(f"one step, batch {report['config']['batch']}", fontsize=10)

    totals = report["drawn"]["totals"]
    pred = report["predicted_by_pixel_counting"]
    ax = axes[1]
    metrics = [("steps_per_s", "steps/s", pred["steps_per_s_ratio"]), ("samples_per_s", "samples/s",
               pred["samples_per_s_ratio"]), ("images_counted_per_s", "images counted/s", None)]
    x = range(len(metrics))
    ax.bar([i - 0.2 for i in x], [totals["full"][k] for k, _, _ in metrics], 0.4, label="full image", color="tab:gray")
    ax.bar([i + 0.2 for i in x], [totals["patch"][k] for k, _, _ in metrics], 0.4, label="patch (real_p "
           f"{report['config']['real_p']})", color="tab:blue")
    for i, (k, _, p) in enumerate(metrics):
        ratio = totals["patch"][k] / totals["full"][k]
        text = f"×{ratio:.2f}" + (f"\n(pixels predict ×{p:.2f})" if p else "")
        ax.text(i + 0.2, totals["patch"][k], text, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), [m[1] for m in metrics])
    ax.margins(y=0.25)
    ax.legend(fontsize=8, loc="upper left")
    sizes = totals["patch"]["sizes"]
    ax.set_title(f"drawn sequence ({totals['full']['steps']} steps each; patch sizes "
                 + ", ".join(f"{k}²: {v}" for k, v in sizes.items()) + "), wall clock", fontsize=9)

    ax = axes[2]
    vals = [totals["full"]["pixels_per_s"] / 1e3, totals["patch"]["pixels_per_s"] / 1e3]
    bars = ax.bar([0, 1], vals, color=["tab:gray", "tab:blue"])
    ax.bar_label(bars, fmt="%.1f", fontsize=9)
    ax.set_xticks([0, 1], ["full image", "patch"])
    ax.set_ylabel("kpixels/s fed to the net (drawn sequence)")
    ratio = report["drawn"]["ratios_patch_over_full"]["pixels_per_s"]
    ax.set_title(f"pixels/s: ×{ratio:.2f} (pixel counting predicts ×1.00)", fontsize=10)
    m = report["machine"]
    fig.suptitle(f"Patch Diffusion training throughput vs full-image training, {RESOLUTION}², "
                 f"{m['device']} ({m['cpu_count']} cores, {m['torch_threads']} threads)", fontsize=11)
    save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="patchdiff bench patch-training", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=100.0, help="timed budget, split between the two phases")
    parser.add_argument("--batch", type=int, default=8, help="batch B (a patch step at 16² carries 4B patches)")
    parser.add_argument("--real-p", type=float, default=0.5)
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.patch_training " + " ".join(sys.argv[1:] if argv is None else argv)
    report = run(args.seconds, args.batch, args.real_p, args.out_dir, command.strip())
    for n, res in report["per_size"].items():
        print(f"{n:16s} {res['median_wall_s'] * 1e3:8.1f} ms wall {res['median_cpu_s'] * 1e3:8.1f} ms CPU "
              f"({res['repeats']} repeats)")
    s, pred = report["stratified"], report["predicted_by_pixel_counting"]
    print(f"per-size medians: patch/full steps/s ×{s['steps_per_s_ratio']:.2f}, samples/s ×{s['samples_per_s_ratio']:.2f}, "
          f"pixels/s ×{s['pixels_per_s_ratio']:.2f} (CPU time: ×{s['cpu_steps_per_s_ratio']:.2f}, "
          f"×{s['cpu_samples_per_s_ratio']:.2f}, ×{s['cpu_pixels_per_s_ratio']:.2f})")
    r = report["drawn"]["ratios_patch_over_full"]
    print(f"drawn sequence:   patch/full steps/s ×{r['steps_per_s']:.2f}, samples/s ×{r['samples_per_s']:.2f}, "
          f"images counted/s ×{r['images_counted_per_s']:.2f}, pixels/s ×{r['pixels_per_s']:.2f}")
    print(f"pixel counting predicts: steps/s ×{pred['steps_per_s_ratio']:.2f}, "
          f"samples/s ×{pred['samples_per_s_ratio']:.2f}, pixels/s ×1.00")
    return 0


if __name__ == "__main__":
    main()
