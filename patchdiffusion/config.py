"""Typed run configuration.

A run is described by one `RunConfig`: which method, which data, the method's own model config,
how to train and how to sample. It is saved as `config.yaml` in every run directory and is enough
to rebuild the model there. Values come from dataclass defaults, then a YAML file, then
`key=value` overrides; a key may be written in full (`train.lr=1e-4`) or as its last part
(`lr=1e-4`), which names the shallowest key of that name and must not be ambiguous.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

import yaml

from patchdiffusion.errors import ConfigError, did_you_mean


# --------------------------------------------------------------------------------------------
# value checks: a config dataclass lists the ranges and choices of its fields in RANGES / CHOICES;
# every float anywhere must be finite unless its range allows infinity.


@dataclass(frozen=True)
class Range:
    """Allowed values of a number: low <= v (or low < v when low_open) and v <= high."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    allow_inf: bool = False

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"<= {self.high:g}")
        return " and ".join(parts) or "finite"

    def check(self, value: float, where: str) -> None:
        if isinstance(value, float) and math.isnan(value):
            raise ConfigError(f"{where} must be a number, got nan")
        if isinstance(value, float) and math.isinf(value):
            if self.allow_inf and value > 0:
                return
            raise ConfigError(f"{where} must be finite, got {value}")
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and value > self.high
        if too_low or too_high:
            raise ConfigError(f"{where} must be {self.describe()}, got {value:g}")


MAX_SIDE = 1 << 20  # a side beyond a million pixels is a typo, not a canvas
POSITIVE = Range(0, low_open=True)
AT_LEAST_ONE = Range(1)
NON_NEGATIVE = Range(0)
PROBABILITY = Range(0, 1)
FINITE = Range()


def check_values(obj: Any, where: str = "") -> None:
    """Refuse values outside a dataclass tree's RANGES/CHOICES, and any non-finite float, with one line."""
    ranges = getattr(type(obj), "RANGES", {})
    choices = getattr(type(obj), "CHOICES", {})
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(value):
            check_values(value, name)
            continue
        values = value if isinstance(value, (tuple, list)) else [value]
        for item in values:
            if dataclasses.is_dataclass(item):
                check_values(item, name)
            elif isinstance(item, (int, float)) and not isinstance(item, bool):
                ranges.get(f.name, FINITE).check(item, name)
        if f.name in choices and value not in choices[f.name]:
            raise ConfigError(f"{name} must be one of {', '.join(map(str, choices[f.name]))}, got {value!r}")


@dataclass
class DataConfig:
    source: str = "builtin:textures"     # folder, .zip, .lmdb, or builtin:textures|photos|digits
    resolution: Union[tuple[int, int], int, str] = (32, 32)  # training size (height, width); "64" or "128x64" (WxH)
    transform: str = "center-crop"       # how stored images of another size are fitted: center-crop | resize
    hflip: bool = True                   # random horizontal flips (decided per example from its own seed)
    use_labels: bool = False             # feed class labels to the model (sources that have them)
    num_workers: int = 0                 # DataLoader worker processes (0 = load in the training process)

    RANGES: ClassVar[dict] = {"resolution": Range(1, MAX_SIDE), "num_workers": Range(0, 256)}
    CHOICES: ClassVar[dict] = {"transform": ("center-crop", "resize")}

    def __post_init__(self) -> None:
        self.resolution = parse_size(self.resolution)


@dataclass
class TrainConfig:
    batch_size: int = 32                 # global batch, summed over all processes
    steps: int = 2000                    # optimizer steps in total
    max_minutes: float = 0.0             # stop early after this much wall time (0 = no limit); a checkpoint is written
    max_cpu_minutes: float = 0.0         # stop after this much CPU time spent in training steps (0 = no limit),
                                         # counted over the whole run like steps (a resume continues the count);
                                         # unlike wall time it ignores other load, so benchmarks budget with it
    lr: float = 2e-4                     # peak learning rate (AdamW)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100              # linear learning-rate warm-up from 0
    grad_clip: float = 1.0               # max global grad norm (0 = off)
    ema_halflife_kimg: float = 0.5       # EMA half-life in thousands of images (EDM convention)
    ema_rampup: float = 0.05             # EMA half-life is at most this fraction of images seen, so early EMA tracks the net
    precision: str = "auto"              # auto | fp32 | bf16 | fp16 (fp16 only on CUDA); auto: bf16 autocast where
                                         # a short probe (cached per machine) finds it faster, else fp32
    compile: str = "auto"                # auto | on | off: torch.compile the step's loss (denoiser + loss); auto
                                         # compiles when the run's budget saves >= 3x the compile time
    seed: int = 0                        # seeds data order, noise, patch positions, initial weights
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    log_every: int = 10                  # steps between metrics.jsonl / TensorBoard rows
    checkpoint_every: int = 500          # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 2            # how many recent checkpoints to keep on disk
    sample_every: int = 0                # steps between sample grids (0 = only at the end)
    sample_images: int = 16              # images in each in-training sample grid
    metric_every: int = 0                # steps between in-training SWD checks (0 = off; costs a sampling run)
    metric_images: int = 256             # images generated (and real images compared) for each SWD check

    RANGES: ClassVar[dict] = {
        "batch_size": Range(1, 1e6), "steps": Range(1, 1e12), "max_minutes": Range(0, 1e7),
        "max_cpu_minutes": Range(0, 1e7), "lr": Range(0, 10, low_open=True), "weight_decay": Range(0, 10),
        "betas": Range(0, 1), "warmup_steps": Range(0, 1e12), "grad_clip": Range(0, 1e6),
        "ema_halflife_kimg": Range(0, 1e9), "ema_rampup": PROBABILITY, "seed": Range(0, 2**63 - 1),
        "log_every": Range(1, 1e12), "checkpoint_every": Range(0, 1e12), "keep_checkpoints": Range(0, 1e6),
        "sample_every": Range(0, 1e12), "sample_images": Range(0, 4096), "metric_every": Range(0, 1e12),
        "metric_images": Range(2, 1e6),
    }
    CHOICES: ClassVar[dict] = {"precision": ("auto", "fp32", "bf16", "fp16"), "compile": ("auto", "on", "off")}

    def __post_init__(self) -> None:
        # Older runs saved `compile: true/false`, and YAML reads a bare on/off as a boolean too.
        self.compile = _COMPILE_WORDS.get(str(self.compile).strip().lower(), self.compile)


_COMPILE_WORDS = {"true": "on", "yes": "on", "1": "on", "on": "on", "false": "off", "no": "off", "0": "off",
                  "off": "off", "auto": "auto"}


@dataclass
class SampleConfig:
    sampler: str = ""                    # "" = the method's default (e.g. heun for EDM models, ddpm for patching)
    num_steps: int = 0                   # sampling steps; 0 = the method's default
    guidance: float = 1.0                # classifier-free guidance scale (1 = off)
    S_churn: float = 0.0                 # EDM stochastic sampling (Heun/Euler)
    S_min: float = 0.0
    S_max: float = float("inf")
    S_noise: float = 1.0
    eta: float = 0.0                     # DDIM stochasticity
    use_ema: bool = True                 # sample from the EMA weights

    RANGES: ClassVar[dict] = {
        "num_steps": Range(0, 1e6), "guidance": Range(0, 1e3), "S_churn": Range(0, 1e6), "S_min": Range(0, 1e6),
        "S_max": Range(0, allow_inf=True), "S_noise": Range(0, 10), "eta": Range(0, 1),
    }
    CHOICES: ClassVar[dict] = {"sampler": ("", "heun", "euler", "ddim", "ddpm", "dpmpp_2m")}


@dataclass
class RunConfig:
    method: str = "full"                 # which method (see `patchdiff train --help` for the list)
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = None                    # the method's own config dataclass (network + diffusion settings)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = method_config_class(self.method)()


def method_config_class(method: str) -> type:
    """The config dataclass of a registered method."""
    from patchdiffusion.registry import method_class

    return method_class(method).Config


# --------------------------------------------------------------------------------------------
# dataclass <-> plain dict


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain YAML-friendly values (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Turn a YAML/CLI value into the annotated type, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot use {value!r}")
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation in (int, float):
        try:
            number = float(value) if annotation is float else value
            if annotation is int:
                if isinstance(value, str):
                    number = float(value)
                if not math.isfinite(float(number)) or float(number) != int(float(number)):
                    raise ValueError
                number = int(float(number))
            return number
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where}: expected {'an integer' if annotation is int else 'a number'}, got {value!r}") from None
    if annotation is str:
        return str(value)
    return value


def from_dict(cls: type, values: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping, refusing unknown keys with a suggestion."""
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        key = unknown[0]
        hint = did_you_mean(key, names) or f" (known: {', '.join(names)})"
        raise ConfigError(f"unknown config key '{where + '.' if where else ''}{key}'{hint}")
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(value, hints[name], f"{where + '.' if where else ''}{name}")
    try:
        built = cls(**kwargs)
    except (TypeError, ValueError) as e:  # a dataclass's own __post_init__ check
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where or cls.__name__}: {e}") from None
    check_values(built, where)
    return built


# --------------------------------------------------------------------------------------------
# RunConfig building


def run_config_from_dict(values: dict) -> RunConfig:
    """A RunConfig from a mapping; the `model` part is typed by the chosen method."""
    values = dict(values or {})
    method = str(values.get("method", RunConfig.method))
    try:
        model_cls = method_config_class(method)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None
    model_values = values.pop("model", None) or {}
    config = from_dict(RunConfig, {k: v for k, v in values.items()})
    config.model = from_dict(model_cls, model_values, "model")
    return config


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    return run_config_from_dict(values)


def save_config(config: RunConfig, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(config), f, sort_keys=False)
    tmp.replace(path)


def _leaf_paths(values: dict, prefix: str = "") -> list[str]:
    paths = []
    for key, value in values.items():
        full = f"{prefix}{key}"
        paths.append(full)
        if isinstance(value, dict):
            paths.extend(_leaf_paths(value, full + "."))
    return paths


def apply_overrides(config: RunConfig, overrides: list[str] | dict[str, Any]) -> RunConfig:
    """Apply `key=value` overrides; keys are dotted paths or unambiguous last parts.

    Values are parsed as YAML scalars (`1e-4`, `true`, `[1,2,2]`). Changing `method` resets `model`
    to the new method's defaults before the other overrides are applied.
    """
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for text in overrides:
            if "=" not in text:
                raise ConfigError(f"override '{text}' is not of the form key=value")
            key, raw = text.split("=", 1)
            items.append((key.strip(), yaml.safe_load(raw) if raw.strip() else ""))
    values = to_dict(config)
    for key, value in items:
        if key == "method" and value != values["method"]:
            values["method"] = value
            try:
                values["model"] = to_dict(method_config_class(str(value))())
            except KeyError as e:
                raise ConfigError(str(e.args[0])) from None
    paths = _leaf_paths(values)
    for key, value in items:
        if key == "method":
            continue
        if key in paths:
            full = key
        else:
            matches = [p for p in paths if p.endswith("." + key)]
            # The shallowest match wins (resolution= means data.resolution, not model.net.resolution).
            shallowest = min((p.count(".") for p in matches), default=0)
            matches = [p for p in matches if p.count(".") == shallowest]
            if len(matches) > 1:
                raise ConfigError(f"config key '{key}' is ambiguous: write one of {', '.join(matches)}")
            if not matches:
                hint = did_you_mean(key, paths + [p.rsplit('.', 1)[-1] for p in paths])
                raise ConfigError(f"unknown config key '{key}'{hint}")
            full = matches[0]
        node = values
        parts = full.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    return run_config_from_dict(values)


def parse_size(value: str | int | tuple | list) -> tuple[int, int]:
    """A size as (height, width), the order of tensors and of config.yaml.

    Text is `N` or `WxH` (width first, as image sizes are written: "128x64" is 128 wide, 64 high);
    an int is a square; a pair is taken as (height, width) already, as config.yaml stores it."""
    try:
        if isinstance(value, (tuple, list)):
            if len(value) != 2:
                raise ValueError
            height, width = (_whole_number(v) for v in value)
        elif isinstance(value, int) and not isinstance(value, bool):
            height = width = value
        else:
            parts = str(value).strip().lower().replace("×", "x").split("x")
            if len(parts) == 1:
                height = width = _whole_number(parts[0])
            elif len(parts) == 2:
                width, height = _whole_number(parts[0]), _whole_number(parts[1])
            else:
                raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"size {value!r} is not of the form N or WxH (e.g. 64 or 128x64)") from None
    if height < 1 or width < 1:
        raise ConfigError(f"size {value!r} must be positive")
    return height, width


def _whole_number(value) -> int:
    number = float(value)
    if not math.isfinite(number) or number != int(number):
        raise ValueError
    return int(number)


def format_size(height: int, width: int) -> str:
    """(height, width) written the way users type it: WxH."""
    return f"{width}x{height}"


# --------------------------------------------------------------------------------------------
# command-line argument types (argparse `type=`) that refuse meaningless numbers in one line


def number_arg(kind: type, minimum: float | None = None, above: float | None = None, maximum: float | None = 1e12):
    """An argparse type: a finite number of `kind` (int or float), >= minimum / > above / <= maximum."""
    import argparse

    def parse(text: str):
        try:
            value = float(text)
            if kind is int:
                if not math.isfinite(value) or value != int(value):
                    raise ValueError
                value = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {text}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"must be greater than {above:g}, got {text}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum:g}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    parse.numeric = True  # what tests/test_cli_values.py walks
    return parse


def size_arg(text: str) -> str:
    """An argparse type: a size N or WxH (kept as text; `parse_size` reads it)."""
    import argparse

    try:
        height, width = parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if max(height, width) > MAX_SIDE:
        raise argparse.ArgumentTypeError(f"size {text!r} is larger than {MAX_SIDE} pixels a side")
    return text


positive_int = number_arg(int, minimum=1)
nonnegative_int = number_arg(int, minimum=0)
positive_float = number_arg(float, above=0)
seed_int = number_arg(int, minimum=0, maximum=2**63 - 1)
