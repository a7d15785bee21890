"""Patch-based DDPM quality in miniature: does patch division cost quality, and does GCC remove seams?

Arakawa et al. 2023 (Table 1, Fig. 4): 2×2 division keeps image quality comparable to the whole-image
DDPM, and Global Content Conditioning makes the patches of one image agree. In miniature, on CPU:
  * data: the built-in `textures` set at 32² (1000 training images); held-out images come from the
    same generator with another seed;
  * four models, same U-Net (dim 16, dim_mults 1,2,4, 2 heads × 16), same training budget in
    optimizer steps (batch 16, lr 1e-3, the project's training loop): N = 1, N = 2 and N = 4 with GCC,
    and N = 4 without GCC (positions on in all);
  * each samples `--num` images with ancestral DDPM (`--sample-steps` respaced steps), EMA weights;
  * SWD (×10³, Karras et al. 2018; `patchdiffusion.eval.swd`) of the samples against held-out images,
    and the seam score (`patchdiffusion.eval.seam`) at the 16-pixel (N = 2) and 8-pixel (N = 4) grid
    lines. For context: SWD of held-out vs training images (the floor at this sample count) and the
    seam score of real images and of the N = 1 model's samples at the same lines (no grid: ≈ 1).
Claims checked: SWD(N=2) ≤ 1.15 × SWD(N=1); seam(N=4, GCC) < seam(N=4, no GCC).
Runs with torch.set_num_threads(1); the total is about 20 CPU-minutes.

    python -m benchmarks.patch_ddpm_quality [--train-steps 1200] [--num 128] [--sample-steps 100] [--out-dir DIR]

Writes DIR/patch_ddpm_quality.json and .png (metrics beside sample grids).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from benchmarks.common import machine_info, save_figure, write_results

RESOLUTION = 32
VARIANTS = {  # name -> (patch_divider, gcc)
    "N=1": (1, True),
    "N=2 GCC": (2, True),
    "N=4 GCC": (4, True),
    "N=4 no GCC": (4, False),
}
NET = ["model.net.dim=16", "model.net.dim_mults=[1,2,4]", "model.net.attn_heads=2", "model.net.attn_dim_head=16"]
TRAIN = ["train.batch_size=16", "train.lr=1e-3", "train.warmup_steps=50", "train.ema_halflife_kimg=2",
         "train.ema_rampup=0.2", "train.sample_images=0", "train.log_every=50", "train.device=cpu", "train.seed=0"]
SWD_CLAIM, SEAM_TILES = 1.15, (16, 8)


def real_images(seed: int, count: int) -> torch.Tensor:
    from patchdiffusion.data import ImageDataset, open_source

    size = (RESOLUTION, RESOLUTION)
    dataset = ImageDataset(open_source(f"builtin:textures?count={count}&seed={seed}", resolution=size), resolution=size)
    return torch.stack([dataset[i][0] for i in range(count)])  # (count, 3, 32, 32) in [-1, 1]


def train_and_sample(name: str, divider: int, gcc: bool, args, work: str) -> dict:
    from patchdiffusion.config import RunConfig, apply_overrides
    from patchdiffusion.sample import sample_images
    from patchdiffusion.train import train

    config = apply_overrides(RunConfig(), ["method=patch_ddpm"])
    config = apply_overrides(config, [
        "data.source=builtin:textures", f"data.resolution={RESOLUTION}", f"model.patch_divider={divider}",
        f"model.gcc={str(gcc).lower()}", f"train.steps={args.train_steps}", f"train.checkpoint_every={args.train_steps}",
        *NET, *TRAIN,
    ])
    start, cpu = time.perf_counter(), time.process_time()
    result = train(config, f"{work}/{name.replace(' ', '_').replace('=', '')}", progress=False, log=lambda *a: None)
    train_cpu, train_wall = time.process_time() - cpu, time.perf_counter() - start
    from patchdiffusion.run import load_run

    loaded = load_run(result.run_dir, "cpu", use_ema=True)
    start, cpu = time.perf_counter(), time.process_time()
    images = torch.cat([
        sample_images(loaded.method, loaded.net, config, min(64, args.num - s), seed0=s, device="cpu",
                    sampler="ddpm", steps=args.sample_steps)
        for s in range(0, args.num, 64)
    ])
    return dict(images=images, steps=result.step, last_loss=result.last_loss, train_cpu_s=train_cpu,
                train_wall_s=train_wall, sample_cpu_s=time.process_time() - cpu,
                sample_wall_s=time.perf_counter() - start)


def metrics(images: torch.Tensor, held_out: torch.Tensor) -> dict:
    from patchdiffusion.eval.monitor import to_uint8_images
    from patchdiffusion.eval.seam import seam_score
    from patchdiffusion.eval.swd import sliced_wasserstein_distance

    pixels, reference = to_uint8_images(images), to_uint8_images(held_out)
    swd = sliced_wasserstein_distance(pixels, reference, seed=0)
    out = dict(swd=swd.average, swd_levels={str(k): v for k, v in swd.levels.items()})
    for tile in SEAM_TILES:
        out[f"seam_{tile}"] = seam_score(pixels, tile).score
    return out


def run(args, command: str) -> dict:
    torch.set_num_threads(1)
    held_out = real_images(seed=1, count=args.num)
    training_like = real_images(seed=0, count=args.num)  # the first training images
    rows, samples = {}, {}
    with tempfile.TemporaryDirectory() as work:
        for name, (divider, gcc) in VARIANTS.items():
            out = train_and_sample(name, divider, gcc, args, work)
            samples[name] = out.pop("images")
            rows[name] = dict(patch_divider=divider, gcc=gcc, **out, **metrics(samples[name], held_out))
            r = rows[name]
            print(f"{name:11s} SWD {r['swd']:6.2f}  seam@16 {r['seam_16']:.3f}  seam@8 {r['seam_8']:.3f}  "
                  f"(loss {r['last_loss']:.4f}, train {r['train_cpu_s']:.0f} CPU-s, sample {r['sample_cpu_s']:.0f} CPU-s)",
                  flush=True)
    real = metrics(training_like, held_out)
    swd_ratio = rows["N=2 GCC"]["swd"] / rows["N=1"]["swd"]
    seam_gcc, seam_plain = rows["N=4 GCC"]["seam_8"], rows["N=4 no GCC"]["seam_8"]
    checks = {
        f"SWD(N=2) <= {SWD_CLAIM} x SWD(N=1)": dict(value=swd_ratio, holds=swd_ratio <= SWD_CLAIM),
        "seam(N=4, GCC) < seam(N=4, no GCC)": dict(value=[seam_gcc, seam_plain], holds=seam_gcc < seam_plain),
    }
    report = dict(
        benchmark="patch_ddpm_quality",
        command=command,
        machine=machine_info(torch.device("cpu")),
        note=("equal training budget in optimizer steps; one seed per variant, so differences of a few SWD units "
              "may be noise (compare with the real-vs-real SWD); machine shared with other jobs"),
        config=dict(resolution=RESOLUTION, train_steps=args.train_steps, num_images=args.num, sampler="ddpm",
                    sample_steps=args.sample_steps, net=NET, train=TRAIN, data="builtin:textures (held-out: seed=1)"),
        results=rows,
        real_images=dict(description="training images (seed 0) vs held-out (seed 1)", **real),
        checks=checks,
        total_cpu_s=sum(r["train_cpu_s"] + r["sample_cpu_s"] for r in rows.values()),
    )
    report["_samples"] = samples  # for the plot only; removed before the JSON is written
    return report


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from patchdiffusion.images import grid, to_uint8

    samples = report.get("_samples") or {}
    names = list(report["results"])
    fig = plt.figure(figsize=(16, 8.5))
    cells = fig.add_gridspec(2, 12)
    for i, name in enumerate(names):
        ax = fig.add_subplot(cells[0, 3 * i:3 * i + 3])
        if name in samples:
            ax.imshow(grid(to_uint8(samples[name][:36]), columns=6, pad=1), interpolation="nearest")
        r = report["results"][name]
        ax.set_title(f"{name}\nSWD {r['swd']:.1f}, seam@8 {r['seam_8']:.2f}, seam@16 {r['seam_16']:.2f}", fontsize=9)
        ax.axis("off")
    real = report["real_images"]
    colors = ["tab:gray", "tab:blue", "tab:green", "tab:red"]
    ax = fig.add_subplot(cells[1, 0:4])
    bars = ax.bar(names, [report["results"][n]["swd"] for n in names], color=colors)
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.axhline(real["swd"], color="k", ls="--", lw=1, label=f"real vs held-out {real['swd']:.1f}")
    ax.set_ylabel("SWD ×10³ vs held-out (lower is better)")
    ax.legend(fontsize=8)
    for j, tile in enumerate(SEAM_TILES):
        ax = fig.add_subplot(cells[1, 4 * j + 4:4 * j + 8])
        values = [report["results"][n][f"seam_{tile}"] for n in names]
        bars = ax.bar(names, values, color=colors)
        ax.set_ylim(max(0.0, min(values + [real[f"seam_{tile}"], 1.0]) - 0.15), None)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.axhline(real[f"seam_{tile}"], color="k", ls="--", lw=1, label=f"real images {real[f'seam_{tile}']:.2f}")
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_ylabel(f"seam score at the {tile}-pixel grid (1 = seamless)")
        ax.legend(fontsize=8)
    for ax in fig.axes[len(names):]:
        ax.tick_params(axis="x", labelsize=8)
    c = report["config"]
    fig.suptitle(f"Patch-based DDPM in miniature: builtin textures {RESOLUTION}², {c['train_steps']} steps each, "
                 f"{c['num_images']} samples (ddpm, {c['sample_steps']} steps)", fontsize=11)
    save_figure(fig, path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="patchdiff bench patch-ddpm-quality", description=__doc__.split("\n")[0])
    parser.add_argument("--train-steps", type=int, default=1200, help="optimizer steps per model (equal budget)")
    parser.add_argument("--num", type=int, default=128, help="samples per model (and held-out images)")
    parser.add_argument("--sample-steps", type=int, default=100, help="respaced ancestral DDPM steps")
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.patch_ddpm_quality " + " ".join(sys.argv[1:] if argv is None else argv)
    report = run(args, command.strip())
    samples = report.pop("_samples")
    write_results(report, args.out_dir, "patch_ddpm_quality", torch.device("cpu"),
                  lambda rep, path: plot({**rep, "_samples": samples}, path))
    for check, c in report["checks"].items():
        print(f"{check:40s} {c['value']}  {'holds' if c['holds'] else 'DOES NOT HOLD'}")
    print(f"total CPU: {report['total_cpu_s'] / 60:.1f} min")
    return 0 if all(c["holds"] for c in report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
