"""Same budget, same recipe: DiMR-tiny against a U-Net of similar FLOPs on builtin:digits (16×16), SWD.

Both networks train with DiMR's recipe (`methods/dimr.py`: Stable Diffusion β schedule, ε-prediction,
DPM-Solver++(2M) sampling); only the backbone differs. The U-Net (`nets/unet.py`, ADM family, time
embedding + scale/shift norms) predicts one ε and is weighted like DiMR's final stage; DiMR-tiny adds
its 4×4 stage's ε at weight 1/4. Both are unconditional here (num_classes 0).

Budget: `--minutes` of CPU time for both together, spent in the same steps, batch and data order for
both, steps interleaved (one DiMR step, one U-Net
step) so both see the same load on a shared machine; FLOPs per forward are counted with
torch.utils.flop_counter (one multiply-add = one FLOP) and reported beside the measured time.
Quality: SWD (×10³, ProGAN protocol, `eval/swd.py`; at 16×16 the pyramid has one level) of EMA samples
against real digits, and the SWD between two halves of the real digits as the floor.

    python -m benchmarks.dimr_comparison [--minutes 10] [--batch 32] [--samples 512] [--out-dir DIR]

Writes DIR/dimr_comparison.json and .png.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from benchmarks.common import machine_info, save_figure, write_results
from patchdiffusion.config import TrainConfig
from patchdiffusion.methods.dimr import DiMRConfig, DiMRMethod
from patchdiffusion.nets.dimr import complexity, dimr_config
from patchdiffusion.nets.unet import UNet, UNetConfig
from patchdiffusion.rng import SampleRNG, mix_seed
from patchdiffusion.methods.base import StepPlan, TrainBatch
from patchdiffusion.train import ema_beta, learning_rate, update_ema

RESOLUTION = 16
UNET = dict(model_channels=16, channel_mult=(1, 2, 4), num_res_blocks=2, attention_resolutions=(8,), head_channels=16)
OPTIM = TrainConfig(lr=2e-3, betas=(0.9, 0.99), weight_decay=0.03, warmup_steps=50, ema_halflife_kimg=2.0,
                    ema_rampup=0.2)


class UNetWithDiMRRecipe(DiMRMethod):
    """DiMR's diffusion recipe around a U-Net backbone (one ε output)."""

    def build_network(self) -> UNet:
        return UNet(UNetConfig(**UNET, resolution=RESOLUTION))


def unet_gflops() -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = UNet(UNetConfig(**UNET, resolution=RESOLUTION))
        x, t = torch.zeros(1, 3, RESOLUTION, RESOLUTION), torch.zeros(1)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, t)
    return counter.get_total_flops() / 2 / 1e9


class Trainee:
    """One backbone with its optimizer and EMA, stepped on given batches."""

    def __init__(self, method):
        self.method = method
        torch.manual_seed(0)
        self.net = method.build_network()
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=OPTIM.lr, betas=OPTIM.betas,
                                           weight_decay=OPTIM.weight_decay)
        self.wall, self.cpu, self.losses = 0.0, 0.0, []

    def step(self, step: int, images: torch.Tensor) -> None:
        start, cpu = time.perf_counter(), time.process_time()
        rng = SampleRNG([mix_seed(0, 2, step, k) for k in range(len(images))])
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(OPTIM, step)
        batch = TrainBatch(images, None, torch.arange(len(images)), StepPlan())
        loss = self.method.loss(self.net, batch, rng).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.optimizer.step()
        update_ema(self.ema, self.net, ema_beta(OPTIM, (step + 1) * len(images), len(images)))
        self.wall += time.perf_counter() - start
        self.cpu += time.process_time() - cpu
        self.losses.append(float(loss.detach()))


def load_digits() -> torch.Tensor:
    from patchdiffusion.data import ImageDataset, open_source

    size = (RESOLUTION, RESOLUTION)
    dataset = ImageDataset(open_source("builtin:digits", resolution=size), resolution=size)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def run(minutes: float, batch: int, samples: int, sample_steps: int, out_dir: str, command: str) -> dict:
    from patchdiffusion.eval.swd import sliced_wasserstein_distance

    torch.set_num_threads(1)  # the machine is shared
    images = load_digits()
    config = DiMRConfig(net=dimr_config("dimr-tiny", num_classes=0))
    dimr = Trainee(DiMRMethod(config, (RESOLUTION, RESOLUTION)))
    unet = Trainee(UNetWithDiMRRecipe(config, (RESOLUTION, RESOLUTION)))
    trainees = {"DiMR-tiny": dimr, "U-Net": unet}

    step = 0
    while dimr.cpu + unet.cpu < minutes * 60:  # CPU time in training steps, so other jobs' load does not matter
        g = torch.Generator().manual_seed(mix_seed(0, 1, step))
        batch_images = images[torch.randint(0, len(images), (batch,), generator=g)]
        for name in (list(trainees) if step % 2 == 0 else list(trainees)[::-1]):  # alternate who goes first
            trainees[name].step(step, batch_images)
        step += 1

    g = torch.Generator().manual_seed(5)
    order = torch.randperm(len(images), generator=g)
    real_a, real_b = images[order[:samples]], images[order[samples: 2 * samples]]
    floor = sliced_wasserstein_distance(real_a, real_b[: len(real_a)], seed=0)
    results, grids = {}, {}
    for name, trainee in trainees.items():
        seeds = [mix_seed(3, i) for i in range(samples)]  # the same noise for both models
        t0 = time.time()
        generated = torch.cat([
            trainee.method.sample(trainee.ema, SampleRNG(seeds[i: i + 128]), steps=sample_steps)
            for i in range(0, samples, 128)
        ])
        sample_seconds = time.time() - t0
        swd = sliced_wasserstein_distance(generated, real_a[: len(generated)], seed=0)
        cost = (complexity(config.net, RESOLUTION, RESOLUTION)["gflops"] if name == "DiMR-tiny" else unet_gflops())
        results[name] = dict(
            parameters=sum(p.numel() for p in trainee.net.parameters()), gflops_per_image=cost,
            train_wall_s=trainee.wall, train_cpu_s=trainee.cpu, ms_per_step_wall=1e3 * trainee.wall / step,
            final_loss_mean_last_50=sum(trainee.losses[-50:]) / len(trainee.losses[-50:]), losses=trainee.losses,
            swd_x1e3=swd.average, sample_seconds=sample_seconds,
        )
        grids[name] = generated[:64]
        print(f"{name:10s} {results[name]['parameters'] / 1e6:.2f}M params, {cost:.3f} GFLOPs, "
              f"{results[name]['ms_per_step_wall']:.0f} ms/step, SWD {swd.average:.1f}")
    report = dict(
        benchmark="dimr_comparison", command=command, machine=machine_info(torch.device("cpu")),
        note="CPU shared with other jobs, one torch thread; the two models' steps are interleaved; the budget is "
             "CPU time (time.process_time) spent in training steps.",
        config=dict(resolution=RESOLUTION, batch=batch, steps=step, images_seen=step * batch, minutes=minutes,
                    samples=samples, sample_steps=sample_steps, sampler="dpmpp_2m", unet=UNET,
                    optimizer=dict(lr=OPTIM.lr, betas=OPTIM.betas, weight_decay=OPTIM.weight_decay,
                                   warmup_steps=OPTIM.warmup_steps, ema_halflife_kimg=OPTIM.ema_halflife_kimg)),
        real_vs_real_swd_x1e3=floor.average, results=results,
    )
    write_results(report, out_dir, "dimr_comparison", torch.device("cpu"), lambda r, p: plot(r, p, grids, real_a[:64]))
    return report


def plot(report: dict, path: str, grids: dict, real: torch.Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from patchdiffusion.images import grid, to_uint8

    fig, axes = plt.subplots(1, 4, figsize=(20, 5))
    panels = [("real digits", real)] + list(grids.items())
    for ax, (name, images) in zip(axes, panels):
        ax.imshow(grid(to_uint8(images), columns=8), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if name in report["results"]:
            r = report["results"][name]
            ax.set_title(f"{name}: SWD {r['swd_x1e3']:.1f}  ({r['parameters'] / 1e6:.2f}M params, "
                         f"{r['gflops_per_image'] * 1e3:.0f} MFLOPs)", fontsize=10)
        else:
            ax.set_title(f"real (SWD real vs real {report['real_vs_real_swd_x1e3']:.1f})", fontsize=10)
    ax = axes[3]
    for name, r in report["results"].items():
        losses = r["losses"]
        window = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                  for i in range(len(losses))]
        ax.plot(smooth, label=f"{name} ({r['ms_per_step_wall']:.0f} ms/step)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (moving mean; DiMR's includes its 1/4-weighted 4×4 term)")
    ax.legend(fontsize=8)
    c = report["config"]
    fig.suptitle(f"DiMR-tiny vs U-Net, same recipe and budget: {c['steps']} steps × batch {c['batch']} on builtin:digits "
                 f"{c['resolution']}², {c['samples']} samples with {c['sample_steps']} DPM-Solver++(2M) steps (CPU, 1 thread)",
                 fontsize=11)
    save_figure(fig, path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="patchdiff bench dimr-comparison", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget of both together (CPU minutes)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--samples", type=int, default=512, help="generated (and real) images for SWD")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.dimr_comparison " + " ".join(sys.argv[1:] if argv is None else argv)
    run(args.minutes, args.batch, args.samples, args.sample_steps, args.out_dir, command.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
