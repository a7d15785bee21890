"""Where the work runs: device choice, torchrun/DDP process groups, mixed precision, compiling.

Training, sampling and evaluation all pick their device here, so none of them imports another.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

try:  # POSIX: runs that start together share the measurement cache under a lock
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

from patchdiffusion.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto' -> CUDA when present, else the CPU; an explicit CUDA device must exist."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device '{name}' is not understood (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was asked for but CUDA is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device '{name}' does not exist: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


@dataclass
class Distributed:
    """This process's place in a torchrun job (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def init_distributed(device: torch.device) -> Distributed:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def autocast_context(precision: str, device: torch.device):
    """The autocast context of a precision name: fp32 (none), bf16, or fp16 (CUDA only)."""
    if precision == "fp32":
        return nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError("precision fp16 needs CUDA; use bf16 (or fp32) on the CPU")
        return torch.autocast("cuda", dtype=torch.float16)
    raise ConfigError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")


def cpu_has_fast_bf16() -> bool:
    """bf16 autocast pays off on CPUs with native bf16 dot products (AVX512-BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# ------------------------------------------------------------------------------------------------
# What this machine measured, kept on disk: the precision probe, compile times and gains, compiled code.


def cache_dir(*parts: str) -> Path:
    """~/.cache/patchdiffusion[/parts]: $PATCHDIFFUSION_CACHE, else $XDG_CACHE_HOME/patchdiffusion."""
    root = os.environ.get("PATCHDIFFUSION_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "patchdiffusion")
    return Path(root, *parts)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_key(device: torch.device) -> str:
    """What a timing taken here belongs to: the processor or GPU, the thread count and torch's version."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return f"{device.type}|{name}|threads={torch.get_num_threads()}|torch={torch.__version__}"


@contextmanager
def _measurements(name: str):
    """A JSON file of measurements under cache_dir(), read and rewritten under a file lock, so that two runs
    starting together (torchrun, a test suite) wait for one another instead of measuring twice. Where the
    cache cannot be written (read-only home) the block gets an empty dict and nothing is kept."""
    path = cache_dir(name)
    lock = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "a")
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
    except OSError:
        lock = None
    try:
        try:
            data = json.loads(path.read_text())
            data = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            data = {}
        before = json.dumps(data, sort_keys=True)
        yield data
        if lock is not None and json.dumps(data, sort_keys=True) != before:
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            try:
                tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
                tmp.replace(path)
            except OSError:
                pass
    finally:
        if lock is not None:
            lock.close()  # closing releases the lock


# ------------------------------------------------------------------------------------------------
# Precision that fits the machine.


BF16_MIN_GAIN = 0.9  # bf16 autocast must take at most this share of fp32's time to be worth its rounding


def probe_bf16(device: torch.device, repeats: int = 4) -> tuple[float, float]:
    """Median seconds of a small conv block's forward + backward in fp32 and in bf16 autocast, alternating."""
    channels, side, batch = (64, 32, 8) if device.type == "cpu" else (128, 64, 32)
    generator = torch.Generator().manual_seed(0)  # the global RNG (dropout's) is left alone
    block = nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(32, channels), nn.SiLU(),
        nn.Conv2d(channels, channels, 3, padding=1),
    ).to(device)
    x = torch.randn(batch, channels, side, side, generator=generator).to(device)

    def run(precision: str) -> float:
        synchronize(device)
        start = time.perf_counter()
        with autocast_context(precision, device):
            y = block(x)
        y.float().square().mean().backward()
        synchronize(device)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for i in range(repeats + 1):
        for precision in times:
            seconds = run(precision)
            if i > 0:  # the first round warms the kernels up
                times[precision].append(seconds)
    return statistics.median(times["fp32"]), statistics.median(times["bf16"])


def choose_precision(requested: str, device: torch.device, probe=probe_bf16) -> tuple[str, str]:
    """The precision a run trains in, and why (one line).

    An explicit fp32 / bf16 / fp16 is used as given. `auto` picks bf16 autocast where it is at least 10%
    faster than fp32 on this machine: a CPU without native bf16 (AVX512-BF16 or AMX) or a GPU without bf16
    gets fp32 at once; otherwise a short probe decides, measured once per machine and device and cached."""
    if requested != "auto":
        autocast_context(requested, device)  # refuses fp16 on the CPU and unknown names, in one line
        return requested, f"precision {requested} (as configured)"
    if device.type == "cpu" and not cpu_has_fast_bf16():
        return "fp32", "precision fp32 (auto: this CPU has no native bf16, where bf16 autocast runs slower)"
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp32", "precision fp32 (auto: this GPU has no bf16)"
    if device.type not in ("cpu", "cuda"):
        return "fp32", f"precision fp32 (auto: no bf16 probe for {device.type} devices)"
    key = device_key(device)
    with _measurements("precision.json") as cache:
        entry = cache.get(key)
        if not (isinstance(entry, dict) and entry.get("fp32_s", 0) > 0 and entry.get("bf16_s", 0) > 0):
            fp32_s, bf16_s = probe(device)
            entry = cache[key] = {"fp32_s": fp32_s, "bf16_s": bf16_s}
    ratio = entry["bf16_s"] / entry["fp32_s"]
    choice = "bf16" if ratio <= BF16_MIN_GAIN else "fp32"
    return choice, (f"precision {choice} (auto: a probe step took {ratio:.2f}x the fp32 time in bf16 on this "
                    f"{device.type}, measured once and cached in {cache_dir('precision.json')})")


def synchronize(device: torch.device) -> None:
    """Wait for the device (CUDA work is queued; timings must not stop the clock early)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------
# A compile that pays: torch.compile only where the calls to come repay its cost 3 times over.


COMPILE_PAYBACK = 3.0          # the time a compile saves must be at least this multiple of what it costs
DEFAULT_COMPILE_GAIN = 0.2     # share of a call's time a compile saves where this machine has not measured it
DEFAULT_SECONDS_PER_OP = 0.06  # compile seconds per operator of the eager call (cold cache), until measured here
WARM_CACHE_SHARE = 0.1         # a compile with inductor's cache filled costs about this share of a cold one


def inductor_cache() -> Path:
    """Point inductor's on-disk cache at ~/.cache/patchdiffusion/inductor (unless TORCHINDUCTOR_CACHE_DIR is
    set), so that a resumed or repeated run loads its compiled code instead of compiling it again."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir("inductor")))
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def compile_key(what: str, device: torch.device) -> str:
    """The key of a compiled function's measurements: what it computes (with its shapes) and where."""
    return f"{what}|{device_key(device)}"


def estimate_compile_seconds(key: str, ops: int) -> tuple[float, str]:
    """How long compiling `key` will take, and how that is known (a few words for the log).

    A key compiled before: its last measured time (a first, cold compile is scaled to a warm cache). A new
    key: its operator count times this machine's cold seconds per operator, from its earlier compiles."""
    with _measurements("compile.json") as cache:
        entry = cache.get(key)
        per_op = [e["cold_s"] / e["ops"] for e in cache.values()
                  if isinstance(e, dict) and e.get("cold_s") and e.get("ops")]
    if isinstance(entry, dict) and entry.get("warm_s"):
        return float(entry["warm_s"]), "as last time"
    if isinstance(entry, dict) and entry.get("cold_s"):
        return float(entry["cold_s"]) * WARM_CACHE_SHARE, "its first compile, now cached"
    seconds_per_op = statistics.median(per_op) if per_op else DEFAULT_SECONDS_PER_OP
    return ops * seconds_per_op, f"{ops} ops at {seconds_per_op:.3f} s"


def expected_compile_gain(key: str) -> tuple[float, str]:
    """The share of a call's time compiling saved last time for `key` (else a default), and its source."""
    with _measurements("compile.json") as cache:
        entry = cache.get(key)
    if isinstance(entry, dict) and entry.get("eager_s") and entry.get("compiled_s"):
        return 1 - entry["compiled_s"] / entry["eager_s"], "measured"
    return DEFAULT_COMPILE_GAIN, "assumed"


def record_compile(key: str, ops: int | None = None, compile_s: float | None = None, eager_s: float | None = None,
                   compiled_s: float | None = None) -> None:
    """Keep what a compile cost and gained, for the next decision about the same key on this machine."""
    with _measurements("compile.json") as cache:
        entry = cache.setdefault(key, {})
        if ops:
            entry["ops"] = int(ops)
        if compile_s is not None:
            entry["warm_s" if entry.get("cold_s") else "cold_s"] = round(float(compile_s), 3)
        if eager_s and compiled_s:
            entry["eager_s"], entry["compiled_s"] = float(eager_s), float(compiled_s)


@dataclass
class CompileChoice:
    compile: bool
    reason: str  # one line for the log

    def __bool__(self) -> bool:
        return self.compile


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def decide_compile(mode: str, budget_s: float, compile_s: float, gain: float, *, how: str = "",
                   gain_how: str = "assumed") -> CompileChoice:
    """Compile or not: `on` and `off` as given; `auto` compiles when the time the compile saves over the
    budget (budget × gain) is at least COMPILE_PAYBACK times what compiling costs."""
    if mode == "on":
        return CompileChoice(True, "compile on (as configured)")
    if mode == "off":
        return CompileChoice(False, "compile off (as configured)")
    if mode != "auto":
        raise ConfigError(f"compile must be auto, on or off, got {mode!r}")
    saved = budget_s * gain
    facts = (f"{_minutes(budget_s)} of eager work, {gain:.0%} faster compiled ({gain_how}) saves "
             f"{_minutes(saved)}; compiling costs ~{_minutes(compile_s)}{f' ({how})' if how else ''}")
    if saved >= COMPILE_PAYBACK * compile_s:
        return CompileChoice(True, f"compile on (auto: {facts}, repaid {saved / max(compile_s, 1e-9):.0f}x)")
    return CompileChoice(False, f"compile off (auto: {facts}, not repaid {COMPILE_PAYBACK:g}x)")


def count_ops(fn, *args, **kwargs):
    """(fn(*args, **kwargs), number of aten operators it ran): the size of what a compile would trace."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.ops += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        result = fn(*args, **kwargs)
    return result, Counter.ops


def compile_function(fn, dynamic: bool = False):
    """torch.compile with inductor's cache on disk. `dynamic=False`: one graph per input shape (Patch
    Diffusion's few patch sizes each get their own) instead of slower shape-generic code."""
    from patchdiffusion.rng import keep_draws_out_of_compiled_graphs

    inductor_cache()
    keep_draws_out_of_compiled_graphs()
    return torch.compile(fn, dynamic=dynamic)


def one_line(error: BaseException) -> str:
    """An exception as one short line (compiler errors run to pages)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"


class MaybeCompiled:
    """`fn`, switched to a compiled copy when the calls still to come repay the compile (see maybe_compile)."""

    def __init__(self, fn, expected_calls: int, mode: str, key: str | None, seconds_per_call: float | None,
                 log, dynamic: bool, compiler=compile_function):
        if mode not in ("auto", "on", "off"):
            raise ConfigError(f"compile must be auto, on or off, got {mode!r}")
        self.fn, self.expected_calls, self.mode, self.key = fn, int(expected_calls), mode, key
        self.seconds_per_call, self.log, self.dynamic, self.compiler = seconds_per_call, log, dynamic, compiler
        self.calls, self.ops, self.compiled, self.compile_key = 0, 0, None, None
        self.choice = CompileChoice(False, "compile off (as configured)") if mode == "off" else None
        self._first_compiled_call = True

    def _say(self, line: str) -> None:
        if self.log is not None:
            self.log(f"{getattr(self.fn, '__qualname__', type(self.fn).__name__)}: {line}")

    def _decide(self, args, kwargs) -> None:
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        what = self.key or getattr(self.fn, "__qualname__", type(self.fn).__name__)
        device = tensors[0].device if tensors else torch.device("cpu")
        self.compile_key = compile_key(f"{what}{[tuple(t.shape) for t in tensors]}", device)
        compile_s, how = estimate_compile_seconds(self.compile_key, self.ops)
        gain, gain_how = expected_compile_gain(self.compile_key)
        remaining = max(0, self.expected_calls - self.calls)
        self.choice = decide_compile(self.mode, remaining * (self.seconds_per_call or 0.0), compile_s, gain,
                                     how=how, gain_how=gain_how)
        self._say(self.choice.reason)
        if self.choice:
            self.compiled = self.compiler(self.fn, dynamic=self.dynamic)

    def _eager_before_deciding(self, args, kwargs):
        """auto: the first call counts the operators (the size of a compile), the second is timed (unless
        the caller gave seconds_per_call); then the decision."""
        self.calls += 1
        if self.calls == 1:
            out, self.ops = count_ops(self.fn, *args, **kwargs)
            if self.seconds_per_call is None:
                return out
        else:
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            device = tensors[0].device if tensors else torch.device("cpu")
            synchronize(device)
            start = time.perf_counter()
            out = self.fn(*args, **kwargs)
            synchronize(device)
            self.seconds_per_call = time.perf_counter() - start
        self._decide(args, kwargs)
        return out

    def __call__(self, *args, **kwargs):
        if self.choice is None:
            if self.mode == "auto":
                return self._eager_before_deciding(args, kwargs)
            self._decide(args, kwargs)  # on: compile at the first call
        self.calls += 1
        if self.compiled is not None:
            try:
                if not self._first_compiled_call:
                    return self.compiled(*args, **kwargs)
                start = time.perf_counter()
                out = self.compiled(*args, **kwargs)  # the call that compiles, timed for the next decision
                record_compile(self.compile_key, self.ops,
                               max(0.0, time.perf_counter() - start - (self.seconds_per_call or 0.0)))
                self._first_compiled_call = False
                return out
            except Exception as error:  # noqa: BLE001 - whatever the compiler raised, eager still works
                self.compiled = None
                self._say(f"compile failed, running eagerly: {one_line(error)}")
        return self.fn(*args, **kwargs)


def maybe_compile(fn, expected_calls: int, *, mode: str = "auto", key: str | None = None,
                  seconds_per_call: float | None = None, log=print, dynamic: bool = False) -> MaybeCompiled:
    """`fn` (a pure function of tensors, e.g. a denoiser) that compiles itself when it pays.

    expected_calls: how many times the caller will call it (a canvas: sampler steps × tile calls).
    mode: auto | on | off (a config's `compile` value). auto counts the operators of the first call and
        times the second (or takes `seconds_per_call`), then compiles when the remaining calls' time ×
        the expected gain (measured before for this key on this machine, else 20%) is at least 3× the
        compile time (measured before, else estimated from the operator count); one log line says which
        and why. Compiled code is cached on disk (inductor_cache), and a compile that fails at any call
        falls back to eager with one line, calling `fn` again with the same arguments (hence: pure).
    key: names what is compiled for the measurements cache (default: fn's name and the input shapes).
    dynamic: passed to torch.compile; False gives one graph per input shape (a last smaller tile batch
        compiles once more instead of running slower shape-generic code).
    """
    return MaybeCompiled(fn, expected_calls, mode, key, seconds_per_call, log, dynamic)
