"""Run directories and checkpoints.

Layout of a run directory::

    config.yaml              the resolved RunConfig (enough to rebuild the model)
    checkpoints/step-00000500/
        net.safetensors      raw network weights
        ema.safetensors      EMA weights (what sampling uses by default)
        state.pt             optimizer, step, images seen, RNG states (tensors and plain values only)
    samples/                 sample grids written during training
    metrics.jsonl            one JSON object per logged step
    events.*                 TensorBoard
    loss.png                 loss curve

A checkpoint is written into a hidden temporary folder and renamed into place, so a crash or a kill
mid-write leaves the previous checkpoint untouched and loadable.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from patchdiffusion.errors import UserError

CHECKPOINT_FILES = ("net.safetensors", "ema.safetensors", "state.pt")


class RunError(UserError):
    """A run directory or checkpoint that cannot be used; the message is meant for the user."""


@dataclass
class Checkpoint:
    path: Path
    step: int


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Checkpoint]:
    """Complete checkpoints, oldest first. Unfinished temporary folders are ignored."""
    found = []
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return found
    for path in root.iterdir():
        if not path.name.startswith("step-") or not path.is_dir():
            continue
        if all((path / name).is_file() for name in CHECKPOINT_FILES):
            try:
                found.append(Checkpoint(path, int(path.name.split("-", 1)[1])))
            except ValueError:
                continue
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def _state_dict_for_safetensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    net_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor],
    train_state: dict,
    keep: int = 2,
) -> Path:
    """Write a checkpoint atomically (temp folder + rename) and prune all but the last `keep`."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_state_dict_for_safetensors(net_state), str(tmp / "net.safetensors"))
    save_file(_state_dict_for_safetensors(ema_state), str(tmp / "ema.safetensors"))
    torch.save(train_state, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old.path, ignore_errors=True)
    return final


def load_weights(checkpoint: Checkpoint | str | Path, which: str = "ema", device: str | torch.device = "cpu"):
    """The `net` or `ema` weights of a checkpoint as a state dict on `device`."""
    path = checkpoint.path if isinstance(checkpoint, Checkpoint) else Path(checkpoint)
    file = path / f"{which}.safetensors"
    if not file.is_file():
        raise RunError(f"checkpoint '{path}' has no {file.name}")
    return load_file(str(file), device=str(device))


def load_train_state(checkpoint: Checkpoint, device: str | torch.device = "cpu") -> dict:
    return torch.load(checkpoint.path / "state.pt", map_location=device, weights_only=True)


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict with a clear error when the checkpoint was made for another config."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise RunError(
            f"checkpoint {where} does not fit this config's network ({detail[:200]}); "
            "was it made with a different model config?"
        ) from None


def append_metrics(run_dir: str | Path, row: dict) -> None:
    with open(Path(run_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
    return rows


# ------------------------------------------------------------------------------------------------
# A trained run, rebuilt from its directory


@dataclass
class LoadedRun:
    config: Any  # the run's RunConfig
    method: Any  # its Method, attached to the run directory
    net: torch.nn.Module
    checkpoint: Checkpoint


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", use_ema: bool = True) -> LoadedRun:
    """Rebuild a run's model from its directory alone (config.yaml + latest checkpoint)."""
    from patchdiffusion.config import load_config
    from patchdiffusion.registry import method_class

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run directory '{run_dir}' does not exist")
    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"'{run_dir}' has no config.yaml; is it a run directory made by `patchdiff train`?")
    config = load_config(run_dir / "config.yaml")
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise RunError(f"run '{run_dir}' has no complete checkpoint yet")
    method = method_class(config.method)(config.model, config.data.resolution)
    method.attach_run(run_dir)
    net = method.build_network()
    load_into(net, load_weights(checkpoint, "ema" if use_ema else "net"), str(checkpoint.path))
    return LoadedRun(config, method, net.to(device).eval(), checkpoint)
