"""Run directories and checkpoints.

Layout of a run directory::

    config.yaml              the resolved RunConfig (enough to rebuild the model)
    checkpoints/step-00000500/
        net.safetensors      raw network weights
        ema.safetensors      EMA weights (what sampling uses by default)
        state.pt             optimizer, step, images seen, RNG states (tensors and plain values only)
        manifest.json        size and sha256 of each file above, written last
    samples/                 sample grids written during training
    metrics.jsonl            one JSON object per logged step
    skipped_images.txt       images of a file data set left out of training, and why (data.open_training_set)
    events.*                 TensorBoard
    loss.png                 loss curve

How a checkpoint is written (`save_checkpoint`), so that a kill, a crash or a full disk at any moment
leaves the previous checkpoint untouched and loadable:
  1. every file goes into a hidden folder `checkpoints/.tmp-step-N-PID/` and is fsynced;
  2. the manifest (each file's size and sha256, hashed from the bytes as they were produced) is
     written last, then the folder itself is fsynced;
  3. the folder is renamed to `step-N` and the parent folder is fsynced, which makes the rename durable;
  4. the new checkpoint is read back and checked against its manifest; only then are older ones pruned.
A disk error on the way removes the temporary folder and raises one `RunError` line naming the
checkpoint still intact. Temporary folders left by a killed process are removed at the next save
(`remove_stale_temp_folders`).

How one is chosen for loading (`newest_verified_checkpoint`, which `latest_checkpoint` calls): the
newest checkpoint whose files match their manifest; a damaged one is skipped with one line saying which
file is wrong and which checkpoint is used instead. Checkpoints written before manifests existed still
load after a cheap structural check (safetensors header and length, zip directory and CRCs of
state.pt), with a note that they are unverified.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import safetensors.torch
from safetensors import SafetensorError

from patchdiffusion.errors import UserError

CHECKPOINT_FILES = ("net.safetensors", "ema.safetensors", "state.pt")
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "patchdiffusion checkpoint manifest"
TEMP_PREFIX = ".tmp-step-"

# Test hook (used by the kill -9 soak in tests/test_train.py): with PATCHDIFF_CHECKPOINT_PAUSE=POINT or
# POINT:STEP the checkpoint writer stops at that point (of that step's checkpoint), prints one line
# "patchdiffusion: checkpoint writer paused at POINT of step-N (pid P)" on stderr and sleeps, so a test can
# kill the process there deterministically. It does nothing unless the variable is set.
PAUSE_ENV = "PATCHDIFF_CHECKPOINT_PAUSE"
PAUSE_POINTS = ("after-net", "after-ema", "after-state", "before-rename")
PAUSE_SECONDS = 600.0

_HASH_CHUNK = 1 << 20


class RunError(UserError):
    """A run directory or checkpoint that cannot be used; the message is meant for the user."""


class CheckpointDamaged(RunError):
    """A checkpoint whose files do not match its manifest (or are structurally broken)."""

    def __init__(self, checkpoint: "Checkpoint", problem: str):
        super().__init__(f"checkpoint {checkpoint.name} is damaged ({problem})")
        self.checkpoint = checkpoint
        self.problem = problem


@dataclass
class Checkpoint:
    path: Path
    step: int

    @property
    def name(self) -> str:
        return self.path.name


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Checkpoint]:
    """Every `step-N` folder, oldest first, whether or not it verifies; temporary folders are ignored."""
    found = []
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return found
    for path in root.iterdir():
        if not path.name.startswith("step-") or not path.is_dir():
            continue
        try:
            found.append(Checkpoint(path, int(path.name.split("-", 1)[1])))
        except ValueError:
            continue
    return sorted(found, key=lambda c: c.step)


# ------------------------------------------------------------------------------------------------
# Verification


def verify_checkpoint(checkpoint: Checkpoint) -> bool:
    """True when every file matches the manifest; False for an older checkpoint without a manifest that
    passes the structural checks. Raises CheckpointDamaged naming the file and what is wrong."""
    path = checkpoint.path
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        _check_structure(checkpoint)
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointDamaged(checkpoint, f"{MANIFEST_NAME}: unreadable or not a checkpoint manifest") from None
    for name in CHECKPOINT_FILES:
        if name not in files:
            raise CheckpointDamaged(checkpoint, f"{MANIFEST_NAME}: does not list {name}")
    for name, expected in files.items():
        if not isinstance(expected, dict):
            raise CheckpointDamaged(checkpoint, f"{MANIFEST_NAME}: the entry of {name} is not a size and sha256")
        file = path / name
        if not file.is_file():
            raise CheckpointDamaged(checkpoint, f"{name}: missing")
        size = file.stat().st_size
        if size != expected.get("size"):
            raise CheckpointDamaged(checkpoint, f"{name}: {size} bytes, the manifest says {expected.get('size')}")
        if file_sha256(file) != expected.get("sha256"):
            raise CheckpointDamaged(checkpoint, f"{name}: sha256 mismatch")
    return True


def _check_structure(checkpoint: Checkpoint) -> None:
    """Cheap checks for a checkpoint without a manifest: catches truncation, not flipped bytes in tensor data."""
    for name in CHECKPOINT_FILES:
        file = checkpoint.path / name
        if not file.is_file():
            raise CheckpointDamaged(checkpoint, f"{name}: missing")
        problem = _safetensors_problem(file) if name.endswith(".safetensors") else _zip_problem(file)
        if problem:
            raise CheckpointDamaged(checkpoint, f"{name}: {problem}")


def _safetensors_problem(file: Path) -> str | None:
    # Layout: 8-byte little-endian header length, JSON header with data_offsets, then the tensor bytes.
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (header_length,) = struct.unpack("<Q", f.read(8))
            if header_length > size - 8:
                return f"truncated ({size} bytes, shorter than its header says)"
            header = json.loads(f.read(header_length))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError):
        return "not a readable safetensors file"
    if 8 + header_length + end != size:
        return f"truncated ({size} bytes, its header describes {8 + header_length + end})"
    return None


def _zip_problem(file: Path) -> str | None:
    # torch.save writes a zip archive; its central directory and per-member CRC32s catch truncation and damage.
    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return "truncated or not a torch checkpoint archive"
    return f"CRC error in {bad}" if bad else None


def newest_verified_checkpoint(run_dir: str | Path, log: Callable[[str], None] | None = print) -> Checkpoint | None:
    """The newest checkpoint that verifies; None when the run has none at all.

    Damaged ones are skipped, each with one line: "checkpoint step-00000400 is damaged
    (net.safetensors: sha256 mismatch); using step-00000200". An older checkpoint without a manifest is
    used with a note that it is unverified. Raises RunError when checkpoints exist but none is usable.
    """
    say = log or (lambda message: None)
    damaged: list[CheckpointDamaged] = []
    for checkpoint in reversed(list_checkpoints(run_dir)):
        try:
            verified = verify_checkpoint(checkpoint)
        except CheckpointDamaged as error:
            damaged.append(error)
            continue
        for error in damaged:
            say(f"{error}; using {checkpoint.name}")
        if not verified:
            say(f"checkpoint {checkpoint.name} has no {MANIFEST_NAME} (written before checksums were added); "
                "loading it unverified")
        return checkpoint
    if damaged:
        details = "; ".join(f"{e.checkpoint.name} ({e.problem})" for e in damaged)
        raise RunError(f"no usable checkpoint in '{run_dir}': every one is damaged: {details}")
    return None


_said: set[tuple[str, str]] = set()


def latest_checkpoint(run_dir: str | Path, log: Callable[[str], None] | None = None) -> Checkpoint | None:
    """The checkpoint to resume or sample from: `newest_verified_checkpoint`, with its notes going to `log`.

    Without `log` they go to stderr, each once per run directory and process (the training loop asks
    several times; the user needs to read it once).
    """
    if log is None:
        where = str(Path(run_dir).resolve())

        def log(message: str) -> None:
            if (where, message) not in _said:
                _said.add((where, message))
                print(f"patchdiffusion: {message}", file=sys.stderr, flush=True)

    return newest_verified_checkpoint(run_dir, log)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class FileRecord:
    size: int
    sha256: str


class _HashingFile:
    """A file opened for writing that hashes what goes through it; closing flushes and fsyncs it."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "xb")
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        data = bytes(data) if not isinstance(data, bytes) else data
        self._file.write(data)
        self._digest.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> FileRecord:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()
        return FileRecord(self.size, self._digest.hexdigest())

    def abandon(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass


def _write_file(path: Path, produce: Callable[[_HashingFile], None]) -> FileRecord:
    out = _HashingFile(path)
    try:
        produce(out)
    except BaseException:
        out.abandon()
        raise
    return out.close()


def save_file(tensors: dict[str, torch.Tensor], path: str | Path) -> FileRecord:
    """Write `tensors` as a safetensors file, fsynced; returns its size and sha256."""
    data = safetensors.torch.save(tensors)
    return _write_file(Path(path), lambda out: out.write(data))


def _save_torch(obj, path: Path) -> FileRecord:
    # Streamed through the hashing file: the optimizer state is never held twice in memory.
    return _write_file(path, lambda out: torch.save(obj, out))


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries (new files, a rename) durable. Some platforms cannot open folders; skip there."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES, errno.EPERM):
            raise
    finally:
        os.close(fd)


def _pause_point(point: str, step: int) -> None:
    wanted = os.environ.get(PAUSE_ENV, "")
    if not wanted:
        return
    name, _, at_step = wanted.partition(":")
    if name != point or (at_step and int(at_step) != step):
        return
    print(f"patchdiffusion: checkpoint writer paused at {point} of step-{step:08d} (pid {os.getpid()})",
          file=sys.stderr, flush=True)
    time.sleep(PAUSE_SECONDS)


def remove_stale_temp_folders(run_dir: str | Path) -> list[Path]:
    """Remove `checkpoints/.tmp-step-*` left by a writer that was killed; returns what was removed.

    Only the process that writes checkpoints may call this (rank 0 of a training run): a run directory
    has one writer, so any temporary folder found before it starts writing is a leftover.
    """
    root = checkpoint_dir(run_dir)
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(TEMP_PREFIX):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


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
    """Write a checkpoint (see the module docstring for the steps) and prune all but the last `keep` usable ones."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_folders(run_dir)
    name = f"step-{step:08d}"
    final = root / name
    tmp = root / f"{TEMP_PREFIX}{step:08d}-{os.getpid()}"
    displaced = root / f"{TEMP_PREFIX}{step:08d}-{os.getpid()}-replaced"
    current = "the checkpoint folder"
    try:
        tmp.mkdir()
        records = {}
        current = "net.safetensors"
        records[current] = save_file(_state_dict_for_safetensors(net_state), tmp / current)
        _pause_point("after-net", step)
        current = "ema.safetensors"
        records[current] = save_file(_state_dict_for_safetensors(ema_state), tmp / current)
        _pause_point("after-ema", step)
        current = "state.pt"
        records[current] = _save_torch(train_state, tmp / current)
        _pause_point("after-state", step)
        current = MANIFEST_NAME
        manifest = {
            "format": MANIFEST_FORMAT, "version": 1, "step": step,
            "files": {file: {"size": r.size, "sha256": r.sha256} for file, r in records.items()},
        }
        text = (json.dumps(manifest, indent=1) + "\n").encode()
        _write_file(tmp / MANIFEST_NAME, lambda out: out.write(text))
        _fsync_dir(tmp)
        _pause_point("before-rename", step)
        current = "the rename into place"
        if final.exists():  # the same step written again (a resumed run passing a damaged one)
            os.replace(final, displaced)
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(displaced, ignore_errors=True)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        intact = _intact_description(run_dir)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise RunError(f"disk full while writing checkpoint {name} ({current}); {intact}; "
                           "free some space, then continue with --resume") from None
        raise RunError(f"cannot write checkpoint {name} ({current}: {error.strerror or error}); {intact}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    written = Checkpoint(final, step)
    try:
        verify_checkpoint(written)
    except CheckpointDamaged as error:
        # Something between the bytes we produced and the disk went wrong: keep every older checkpoint.
        raise RunError(f"{error} right after it was written; older checkpoints were kept") from None
    if keep > 0:
        _prune(run_dir, written, keep)
    return final


def _intact_description(run_dir: str | Path) -> str:
    try:
        previous = newest_verified_checkpoint(run_dir, log=None)
    except RunError:
        previous = None
    if previous is None:
        return "no earlier checkpoint exists, so a resume would start from step 0"
    return f"the previous checkpoint {previous.name} is intact"


def _prune(run_dir: str | Path, written: Checkpoint, keep: int) -> None:
    """Keep `written` and the newest usable checkpoints before it, `keep` usable ones in all.

    A damaged checkpoint does not count towards `keep` (it is kept while newer than the oldest kept
    usable one, removed once older), so pruning never removes the newest checkpoint that loads.
    Checkpoints with a higher step than `written` (left by the run before a resume from an older one) are
    never removed here; they are replaced when the run reaches their step.
    """
    usable = 1
    for checkpoint in reversed(list_checkpoints(run_dir)):
        if checkpoint.step >= written.step:
            continue
        if usable >= keep:
            shutil.rmtree(checkpoint.path, ignore_errors=True)
            continue
        if _usable(checkpoint):
            usable += 1


# Verification results of older checkpoints while pruning, keyed by the files' stat signature, so that
# each save hashes only the checkpoint it wrote (and, once, the one a run resumed from).
_usable_cache: dict[str, tuple[tuple, bool]] = {}


def _usable(checkpoint: Checkpoint) -> bool:
    signature = []
    for path in sorted(checkpoint.path.iterdir()):
        status = path.stat()
        signature.append((path.name, status.st_size, status.st_mtime_ns, status.st_ino))
    key = str(checkpoint.path)
    cached = _usable_cache.get(key)
    if cached is not None and cached[0] == tuple(signature):
        return cached[1]
    try:
        verify_checkpoint(checkpoint)
        usable = True
    except CheckpointDamaged:
        usable = False
    _usable_cache[key] = (tuple(signature), usable)
    return usable


# ------------------------------------------------------------------------------------------------
# Loading


def _checkpoint_path(checkpoint: Checkpoint | str | Path) -> Path:
    return checkpoint.path if isinstance(checkpoint, Checkpoint) else Path(checkpoint)


def _unreadable(file: Path, error: Exception) -> RunError:
    """One line for a library error about a checkpoint file (SafetensorError, PytorchStreamReader, EOF)."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "PytorchStreamReader" in first or "central directory" in first:
        first = "not a complete torch archive"
    return RunError(f"cannot read checkpoint file '{file}': truncated or corrupt ({first[:160]}); "
                    "an older checkpoint may still load (resume and sample pick the newest that verifies)")


def _is_device_error(error: Exception) -> bool:
    """Out of memory or a CUDA failure while loading: the file is fine, so not reported as damaged."""
    return isinstance(error, torch.OutOfMemoryError) or "CUDA" in str(error)


def load_weights(checkpoint: Checkpoint | str | Path, which: str = "ema", device: str | torch.device = "cpu"):
    """The `net` or `ema` weights of a checkpoint as a state dict on `device`."""
    path = _checkpoint_path(checkpoint)
    file = path / f"{which}.safetensors"
    if not file.is_file():
        raise RunError(f"checkpoint '{path}' has no {file.name}")
    try:
        return safetensors.torch.load_file(str(file), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        if _is_device_error(error):
            raise
        raise _unreadable(file, error) from None


def load_train_state(checkpoint: Checkpoint | str | Path, device: str | torch.device = "cpu") -> dict:
    file = _checkpoint_path(checkpoint) / "state.pt"
    if not file.is_file():
        raise RunError(f"checkpoint '{file.parent}' has no state.pt")
    try:
        return torch.load(file, map_location=device, weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
        if _is_device_error(error):
            raise
        raise _unreadable(file, error) from None


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


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", use_ema: bool | None = True) -> LoadedRun:
    """Rebuild a run's model from its directory alone (config.yaml + the newest checkpoint that verifies);
    use_ema None = the run's own `sample.use_ema`."""
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
    if use_ema is None:
        use_ema = config.sample.use_ema
    load_into(net, load_weights(checkpoint, "ema" if use_ema else "net"), str(checkpoint.path))
    return LoadedRun(config, method, net.to(device).eval(), checkpoint)
