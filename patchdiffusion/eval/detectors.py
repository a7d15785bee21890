"""Inception weights from a local file, and the input pipeline of the reference tool each file belongs to.

No weights can be downloaded here, so the file is found, in order, at `--inception PATH`, at the
path in the environment variable PATCHDIFF_INCEPTION, or under ~/.cache/patchdiffusion/ (or
$XDG_CACHE_HOME/patchdiffusion/) with one of its published names. Three formats are accepted:

  pytorch-fid state dict  pt_inception-2015-12-05-6726825d.pth (torch.save of a state dict; also
                          .safetensors with the same keys). Loaded into `inception.InceptionV3`.
                          Pipeline, as pytorch-fid: uint8 -> /255 -> bilinear resize to 299x299
                          (torch interpolate, align_corners=False, no antialiasing) -> 2x - 1.
  TorchScript detector    inception-2015-12-05.pt (StyleGAN2-ADA), or any torch.jit.save archive
                          with the same interface: forward(uint8 images (B, 3, H, W),
                          return_features=False, ...) -> (B, 2048) features or (B, 1008) softmax.
                          The uint8 images go in as they are: the detector resizes and normalises
                          internally, which is what EDM's fid.py and StyleGAN's metrics rely on.
  EDM/StyleGAN3 pickle    inception-2015-12-05.pkl: that same TorchScript detector inside a pickle (written
                          through dnnlib's `persistence`). Read with a restricted unpickler (`_RestrictedUnpickler`):
                          only the names such a file needs resolve, the Python source a persistence record
                          carries is never run, and anything else is refused with one line.

Every file is checked against the sha256 published for it (`PUBLISHED_SHA256`); one that matches none
is loaded with a loud warning (`UnverifiedInceptionWarning`, and a WARNING line in the eval report) that
its figures are not comparable with published FIDs.

Both kinds of detector return the 2048-d pool3 features and, when asked, the 1008-way class
probabilities for the Inception Score, softmax of the logits *without* the output bias (as the
original IS code and StyleGAN's `no_output_bias=True`).
"""

from __future__ import annotations

import codecs
import collections
import hashlib
import io
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from .errors import EvalError
from .inception import FEATURE_DIM, INPUT_SIZE, NUM_CLASSES, InceptionV3, build_inception

ENV_VAR = "PATCHDIFF_INCEPTION"
KNOWN_FILE_NAMES = (
    "pt_inception-2015-12-05-6726825d.pth",
    "pt_inception-2015-12-05.pth",
    "inception-2015-12-05.pkl",
    "inception-2015-12-05.pt",
    "pt_inception-2015-12-05.safetensors",
)

# sha256 of the Inception weights files as published, -> what the file is. Only files listed here give
# figures comparable with published FIDs; any other file (a conversion, random weights) loads with a warning.
#   pytorch-fid's port (github.com/mseitzer/pytorch-fid, release "fid_weights"): the name's "6726825d" is the
#   start of this digest (torch.hub's naming rule); the full digest is listed beside that URL in
#   qiuyu96/Carver models/inception_model.py (_MODEL_URL_SHA256), and several projects record the same digest
#   for torch-fidelity's copy, weights-inception-2015-12-05-6726825d.pth.
# Not listed, because no published sha256 could be found: EDM/StyleGAN3's inception-2015-12-05.pkl (NVIDIA NGC),
# StyleGAN2-ADA's TorchScript inception-2015-12-05.pt, and .safetensors conversions (ours to make, so
# never published). Such files load, always with the warning; add their digests here once published.
PUBLISHED_SHA256 = {
    "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2":
        "pytorch-fid pt_inception-2015-12-05-6726825d.pth",
}


class UnverifiedInceptionWarning(UserWarning):
    """The Inception weights file is not one whose sha256 was published: FIDs are not comparable."""


PIPELINE_PYTORCH_FID = (
    "pytorch-fid (uint8 RGB -> /255 -> bilinear resize to 299x299 with torch interpolate, align_corners=False, "
    "no antialiasing -> [-1, 1]; pool3 features; IS from logits without the output bias)"
)
PIPELINE_TORCHSCRIPT = (
    "EDM / StyleGAN3 TorchScript detector (uint8 RGB passed as is; the detector resizes to 299x299 and "
    "normalises internally; IS from its no_output_bias softmax)"
)


def default_inception_dir() -> Path:
    """Where a weights file is looked for when neither --inception nor PATCHDIFF_INCEPTION names one."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "patchdiffusion"


def missing_weights_message() -> str:
    """The explanation printed when no weights file is found (FID, KID, IS, precision/recall then skip)."""
    return (
        "no Inception weights file: FID, KID, IS and precision/recall need the 2015-12-05 Inception-v3 weights, "
        "which are not downloaded automatically. Pass a file with --inception PATH, set "
        f"{ENV_VAR}=PATH, or put it in {default_inception_dir()}/ under its published name. Accepted: "
        "pytorch-fid's state dict pt_inception-2015-12-05-6726825d.pth (github.com/mseitzer/pytorch-fid, release "
        "'fid_weights'; .safetensors with the same keys also works), EDM/StyleGAN3's inception-2015-12-05.pkl, "
        "or StyleGAN2-ADA's TorchScript inception-2015-12-05.pt. Weight-free metrics (swd, seam) still run."
    )


def find_inception_file(path: str | os.PathLike | None = None) -> Path | None:
    """The weights file to use: `path`, else $PATCHDIFF_INCEPTION, else a known name in the cache folder."""
    explicit = path or os.environ.get(ENV_VAR)
    if explicit:
        found = Path(explicit).expanduser()
        if not found.is_file():
            where = "--inception" if path else ENV_VAR
            raise EvalError(f"Inception weights file '{found}' (from {where}) does not exist")
        return found
    folder = default_inception_dir()
    for name in KNOWN_FILE_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


@dataclass(frozen=True)
class InceptionOutputs:
    features: torch.Tensor  # (B, 2048) float32 pool3 features
    class_probs: torch.Tensor | None  # (B, 1008) softmax without the output bias, when asked for


class InceptionDetector(Protocol):
    path: Path  # the weights file
    format: str  # what the file was recognised as
    pipeline: str  # the reference tool whose input pipeline this matches, and the steps
    sha256: str | None  # of the weights file (None for in-memory detectors)
    published_as: str | None  # the published file it is, by sha256; None when it matches none
    warning: str | None  # why its figures are not comparable with published ones, or None

    def to(self, device: torch.device) -> "InceptionDetector": ...

    def __call__(self, images: torch.Tensor, with_class_probs: bool = False) -> InceptionOutputs:
        """uint8 (B, 3, H, W) RGB images of any size -> pool3 features (and class probabilities)."""
        ...


class PytorchFIDDetector:
    """`InceptionV3` with pytorch-fid's input pipeline."""

    format = "pytorch-fid state dict (pt_inception-2015-12-05)"
    pipeline = PIPELINE_PYTORCH_FID
    sha256 = published_as = warning = None  # set by load_inception from the file

    def __init__(self, net: InceptionV3, path: Path, channels_last: bool = True):
        self.net = net.eval().requires_grad_(False)
        self.path = path
        # channels_last lets oneDNN/cuDNN pick faster convolution kernels; the numbers differ only by round-off.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net = self.net.to(memory_format=self.memory_format)

    def to(self, device: torch.device) -> "PytorchFIDDetector":
        self.net = self.net.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, with_class_probs: bool = False) -> InceptionOutputs:
        device = next(self.net.parameters()).device
        x = images.to(device).float() / 255.0
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = (2.0 * x - 1.0).contiguous(memory_format=self.memory_format)
        features = self.net.pool3(x)
        probs = None
        if with_class_probs:
            probs = torch.softmax(features @ self.net.fc.weight.T, dim=1)  # no output bias (Salimans et al.)
        return InceptionOutputs(features.float(), probs)


class TorchScriptDetector:
    """A TorchScript (or pickled) detector with EDM / StyleGAN3's interface."""

    pipeline = PIPELINE_TORCHSCRIPT
    sha256 = published_as = warning = None  # set by load_inception from the file

    def __init__(self, module: torch.nn.Module, path: Path, format: str):
        self.module = module.eval()
        self.path = path
        self.format = format

    def to(self, device: torch.device) -> "TorchScriptDetector":
        self.module = self.module.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, with_class_probs: bool = False) -> InceptionOutputs:
        device = _module_device(self.module)
        images = images.to(device)
        features = self.module(images, return_features=True).float()
        _check_width(features, FEATURE_DIM, self.path, "features")
        probs = None
        if with_class_probs:
            probs = self.module(images, no_output_bias=True).float()
            _check_width(probs, NUM_CLASSES, self.path, "class probabilities")
        return InceptionOutputs(features, probs)


def _module_device(module: torch.nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _check_width(output: torch.Tensor, width: int, path: Path, what: str) -> None:
    if output.ndim != 2 or output.shape[1] != width:
        raise EvalError(f"the detector in '{path}' returned {what} of shape {tuple(output.shape)}, not (B, {width})")


# ------------------------------------------------------------------------------------------------
# Loading


def load_inception(path: str | os.PathLike, channels_last: bool = True, warn: bool = True) -> InceptionDetector:
    """Recognise and load a weights file (see the module docstring for the accepted formats).

    The file's sha256 is compared with the published ones: `detector.published_as` names the match, and
    without one `detector.warning` says the figures are not comparable (also raised as an
    UnverifiedInceptionWarning when `warn`).
    """
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"Inception weights file '{path}' does not exist")
    detector = _load_detector_file(path, channels_last)
    digest = _file_sha256(path)
    detector.sha256 = digest
    detector.published_as = PUBLISHED_SHA256.get(digest)
    detector.warning = None if detector.published_as else unverified_weights_message(path, digest)
    if detector.warning and warn:
        warnings.warn(detector.warning, UnverifiedInceptionWarning, stacklevel=2)
    return detector


def unverified_weights_message(path: Path, digest: str) -> str:
    """The warning for a weights file whose sha256 matches no published file."""
    if path.suffix in (".pkl", ".pt", ".safetensors"):
        why = (f"no sha256 has been published for {path.suffix} Inception files, so this one cannot be checked; "
               "only pytorch-fid's pt_inception-2015-12-05-6726825d.pth can be")
    else:
        why = "it is not pytorch-fid's published pt_inception-2015-12-05-6726825d.pth (nor another published file)"
    return (f"WARNING: Inception weights '{path}' have sha256 {digest[:16]}..., which matches no published file "
            f"({why}): FID, KID, IS and precision/recall from them are NOT comparable with published figures")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load_detector_file(path: Path, channels_last: bool) -> InceptionDetector:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as error:  # SafetensorError for truncated or foreign files
            raise EvalError(f"cannot read '{path}' as safetensors Inception weights ({str(error)[:200]})") from None
        return _from_state_dict(state, path, channels_last)
    if path.suffix == ".pkl":
        return _from_pickle(path, channels_last)
    if _is_torchscript_archive(path):
        return TorchScriptDetector(torch.jit.load(str(path), map_location="cpu"), path, "TorchScript detector")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise EvalError(
            f"cannot read '{path}' as Inception weights ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            "expected a pytorch-fid state dict (.pth), a TorchScript detector (.pt) or EDM's .pkl"
        ) from None
    return _from_state_dict(state, path, channels_last)


def _is_torchscript_archive(path: Path) -> bool:
    """torch.jit.save writes a zip with compiled code in it; torch.save of a state dict has none."""
    with open(path, "rb") as file:
        # Starts with a zip header (zipfile.is_zipfile alone also accepts files that merely embed one).
        if file.read(4) != b"PK\x03\x04" or not zipfile.is_zipfile(path):
            return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("constants.pkl") for name in archive.namelist())


# ------------------------------------------------------------------------------------------------
# EDM's pickle, read without running anything it names
#
# EDM (and StyleGAN3) load the detector with a plain `pickle.load` of inception-2015-12-05.pkl. The pickle
# is written through dnnlib's `torch_utils.persistence`: the object is rebuilt by
# `torch_utils.persistence._reconstruct_persistent_obj(meta)`, where `meta` carries the Python source of the
# object's class (`module_src`, which a plain load executes), its name and its state; the state holds the
# TorchScript detector, itself pickled as `torch.jit.load(io.BytesIO(archive bytes))`, or the archive bytes.
# The restricted unpickler resolves only the names below. `_reconstruct_persistent_obj` is replaced by a
# function that keeps `meta` as data, so the embedded source is never compiled, and the TorchScript
# archive is loaded with torch.jit.load, which reads TorchScript (no Python) onto the CPU. Tensors use
# torch's own rebuild functions, with storages read by torch.load(weights_only=True).


class _PersistentRecord:
    """A dnnlib persistence record, as data: the class name and state; its embedded source is not run."""

    def __init__(self, meta):
        if not isinstance(meta, dict):
            raise pickle.UnpicklingError("a torch_utils.persistence record that is not a dict")
        self.class_name = str(meta.get("class_name"))
        self.state = meta.get("state")


def _torchscript_from_buffer(buffer) -> torch.jit.ScriptModule:
    return torch.jit.load(buffer, map_location="cpu")


def _storage_from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


_ALLOWED_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _PersistentRecord,
    ("torch.jit._serialization", "load"): _torchscript_from_buffer,
    ("torch.jit", "load"): _torchscript_from_buffer,
    ("_io", "BytesIO"): io.BytesIO,
    ("io", "BytesIO"): io.BytesIO,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("dnnlib.util", "EasyDict"): dict,  # dnnlib's attribute dict; a plain dict carries the same data
    ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles store bytes
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
}


class _Refused(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.qualified = f"{module}.{name}"


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(module, name) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not used by Inception pickles")


def _find_torchscript(value, depth: int = 0) -> torch.jit.ScriptModule | None:
    """The TorchScript detector inside what the pickle held (a record's state, a dict, a list, archive bytes)."""
    if depth > 6:
        return None
    if isinstance(value, torch.jit.ScriptModule):
        return value
    if isinstance(value, _PersistentRecord):
        return _find_torchscript(value.state, depth + 1)
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _find_torchscript(item, depth + 1)
            if found is not None:
                return found
        return None
    if isinstance(value, (bytes, bytearray)) and value[:4] == b"PK\x03\x04":
        try:
            return torch.jit.load(io.BytesIO(bytes(value)), map_location="cpu")
        except Exception:
            return None
    return None


def _from_pickle(path: Path, channels_last: bool) -> InceptionDetector:
    hint = "use pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or StyleGAN2-ADA's TorchScript .pt) instead"
    try:
        with open(path, "rb") as file:
            loaded = _RestrictedUnpickler(file).load()
    except _Refused as refused:
        raise EvalError(
            f"refused to load '{path}': the pickle refers to {refused.qualified}, which is not among the few names "
            f"an Inception detector pickle needs, and unpickling it could run code; nothing was run. {hint}"
        ) from None
    except Exception as error:
        raise EvalError(f"cannot read '{path}' as an Inception pickle ({type(error).__name__}: "
                        f"{str(error)[:200]}); {hint}") from None
    if isinstance(loaded, dict) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return _from_state_dict(loaded, path, channels_last)
    module = _find_torchscript(loaded)
    if module is not None:
        return TorchScriptDetector(module, path, "EDM/StyleGAN3 pickled detector")
    if isinstance(loaded, _PersistentRecord):
        raise EvalError(
            f"refused to load '{path}': it holds a Python class '{loaded.class_name}' whose code is stored in the "
            f"pickle itself, and running code from a weights file is not done here; {hint}"
        )
    raise EvalError(f"'{path}' holds a {type(loaded).__name__}, not an Inception detector or a state dict")


def _from_state_dict(state: dict, path: Path, channels_last: bool) -> PytorchFIDDetector:
    if not isinstance(state, dict):
        raise EvalError(f"'{path}' holds a {type(state).__name__}, not a state dict of Inception weights")
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    net = build_inception()
    check_state_dict(state, net, path)
    # BatchNorm's num_batches_tracked is bookkeeping for training; files may or may not carry it.
    expected = net.state_dict()
    filled = {key: state.get(key, expected[key]) for key in expected}
    net.load_state_dict(filled)
    return PytorchFIDDetector(net, path, channels_last)


def check_state_dict(state: dict, net: InceptionV3, path: Path | str = "state dict") -> None:
    """Raise EvalError naming what differs when `state` does not have the pytorch-fid layout."""
    expected = {key: tuple(value.shape) for key, value in net.state_dict().items()}
    optional = {key for key in expected if key.endswith("num_batches_tracked")}
    given = {key: tuple(value.shape) for key, value in state.items() if not key.startswith("AuxLogits.")}
    missing = sorted(set(expected) - set(given) - optional)
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(key for key in set(given) & set(expected) if given[key] != expected[key])
    if not (missing or unexpected or wrong):
        return
    if given.get("fc.weight") == (1000, FEATURE_DIM):
        hint = " (1000 classes: this looks like torchvision's ImageNet Inception-v3, not the 2015-12-05 FID graph)"
    else:
        hint = ""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        parts.append("wrong shapes: " + ", ".join(f"{k} {given[k]} != {expected[k]}" for k in wrong[:3]))
    raise EvalError(f"'{path}' is not a pytorch-fid Inception state dict{hint}: " + "; ".join(parts))


def random_inception_detector(seed: int = 0, path: str = "<random weights>") -> PytorchFIDDetector:
    """A randomly initialised network with the pytorch-fid pipeline, for tests and benchmarks (numbers mean nothing)."""
    return PytorchFIDDetector(build_inception(seed), Path(path))
