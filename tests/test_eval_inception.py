"""The Inception-v3 network and its weights files: layout, output shapes, every accepted format.

No real weights exist here, so a randomly initialised network is saved in each supported format.
"""

import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from patchdiffusion.eval import (
    ENV_VAR,
    EvalError,
    PytorchFIDDetector,
    TorchScriptDetector,
    build_inception,
    find_inception_file,
    load_inception,
    missing_weights_message,
)

# Random weights are unpublished by nature: their warning is expected (and checked once, below).
pytestmark = pytest.mark.filterwarnings("ignore::patchdiffusion.eval.detectors.UnverifiedInceptionWarning")

# ------------------------------------------------------------------------------------------------
# The published architecture (Szegedy et al. 2016, and the 2015-12-05 graph as ported by pytorch-fid),
# written out layer by layer: (name, in channels, out channels, kernel (h, w)).


def stem():
    return [("Conv2d_1a_3x3", 3, 32, (3, 3)), ("Conv2d_2a_3x3", 32, 32, (3, 3)), ("Conv2d_2b_3x3", 32, 64, (3, 3)),
            ("Conv2d_3b_1x1", 64, 80, (1, 1)), ("Conv2d_4a_3x3", 80, 192, (3, 3))]


def mixed_35(cin, pool):  # Mixed_5b, 5c, 5d
    return [("branch1x1", cin, 64, (1, 1)), ("branch5x5_1", cin, 48, (1, 1)), ("branch5x5_2", 48, 64, (5, 5)),
            ("branch3x3dbl_1", cin, 64, (1, 1)), ("branch3x3dbl_2", 64, 96, (3, 3)),
            ("branch3x3dbl_3", 96, 96, (3, 3)), ("branch_pool", cin, pool, (1, 1))]


def reduction_35(cin):  # Mixed_6a
    return [("branch3x3", cin, 384, (3, 3)), ("branch3x3dbl_1", cin, 64, (1, 1)),
            ("branch3x3dbl_2", 64, 96, (3, 3)), ("branch3x3dbl_3", 96, 96, (3, 3))]


def mixed_17(c7):  # Mixed_6b..6e, 768 channels in and out
    return [("branch1x1", 768, 192, (1, 1)), ("branch7x7_1", 768, c7, (1, 1)), ("branch7x7_2", c7, c7, (1, 7)),
            ("branch7x7_3", c7, 192, (7, 1)), ("branch7x7dbl_1", 768, c7, (1, 1)),
            ("branch7x7dbl_2", c7, c7, (7, 1)), ("branch7x7dbl_3", c7, c7, (1, 7)),
            ("branch7x7dbl_4", c7, c7, (7, 1)), ("branch7x7dbl_5", c7, 192, (1, 7)), ("branch_pool", 768, 192, (1, 1))]


def reduction_17():  # Mixed_7a
    return [("branch3x3_1", 768, 192, (1, 1)), ("branch3x3_2", 192, 320, (3, 3)),
            ("branch7x7x3_1", 768, 192, (1, 1)), ("branch7x7x3_2", 192, 192, (1, 7)),
            ("branch7x7x3_3", 192, 192, (7, 1)), ("branch7x7x3_4", 192, 192, (3, 3))]


def mixed_8(cin):  # Mixed_7b (1280 in), Mixed_7c (2048 in)
    return [("branch1x1", cin, 320, (1, 1)), ("branch3x3_1", cin, 384, (1, 1)),
            ("branch3x3_2a", 384, 384, (1, 3)), ("branch3x3_2b", 384, 384, (3, 1)),
            ("branch3x3dbl_1", cin, 448, (1, 1)), ("branch3x3dbl_2", 448, 384, (3, 3)),
            ("branch3x3dbl_3a", 384, 384, (1, 3)), ("branch3x3dbl_3b", 384, 384, (3, 1)),
            ("branch_pool", cin, 192, (1, 1))]


def published_layers():
    blocks = {
        "Mixed_5b": mixed_35(192, 32), "Mixed_5c": mixed_35(256, 64), "Mixed_5d": mixed_35(288, 64),
        "Mixed_6a": reduction_35(288),
        "Mixed_6b": mixed_17(128), "Mixed_6c": mixed_17(160), "Mixed_6d": mixed_17(160), "Mixed_6e": mixed_17(192),
        "Mixed_7a": reduction_17(), "Mixed_7b": mixed_8(1280), "Mixed_7c": mixed_8(2048),
    }
    layers = stem()
    for block, convs in blocks.items():
        layers += [(f"{block}.{name}", cin, cout, kernel) for name, cin, cout, kernel in convs]
    return layers


def published_state_dict_shapes():
    shapes = {}
    for name, cin, cout, (kh, kw) in published_layers():
        shapes[f"{name}.conv.weight"] = (cout, cin, kh, kw)  # convolutions have no bias
        for part in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{part}"] = (cout,)
    shapes["fc.weight"] = (1008, 2048)
    shapes["fc.bias"] = (1008,)
    return shapes


def test_state_dict_has_the_pytorch_fid_layout():
    net = build_inception(seed=0)
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    expected = published_state_dict_shapes()
    assert len(published_layers()) == 94  # conv layers of Inception-v3 without the auxiliary head
    assert sorted(set(expected) - set(ours)) == []
    assert sorted(set(ours) - set(expected)) == []
    assert {k: ours[k] for k in expected} == expected
    assert all(module.eps == 1e-3 for module in net.modules() if isinstance(module, torch.nn.BatchNorm2d))


# ------------------------------------------------------------------------------------------------
# Weights files in every accepted format, made from one random network.


class DetectorLikeEDM(torch.nn.Module):
    """The interface of EDM / StyleGAN3's TorchScript detector, around our network: uint8 in, resize inside."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        x = F.interpolate(img.to(torch.float32), size=(299, 299), mode="bilinear", align_corners=False)
        features = self.net.pool3(x / 127.5 - 1)
        if return_features:
            return features
        logits = features @ self.net.fc.weight.t()
        if not no_output_bias:
            logits = logits + self.net.fc.bias
        return torch.softmax(logits, dim=1)


class PickledTorchScript:
    """Pickles to 'torch.jit.load(bytes)', so pickle.load gives back the TorchScript module (like EDM's .pkl)."""

    def __init__(self, data: bytes):
        self.data = data

    def __reduce__(self):
        return torch.jit.load, (io.BytesIO(self.data),)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inception")
    net = build_inception(seed=0)
    state = net.state_dict()
    files = {
        "state_dict": folder / "pt_inception-2015-12-05-random.pth",
        "legacy": folder / "legacy.pth",
        "safetensors": folder / "random.safetensors",
        "torchscript": folder / "inception-2015-12-05.pt",
        "pickle": folder / "inception-2015-12-05.pkl",
    }
    torch.save(state, files["state_dict"])
    # The published pytorch-fid file predates torch's zip format, and has no num_batches_tracked.
    legacy = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(legacy, files["legacy"], _use_new_zipfile_serialization=False)
    save_file(legacy, str(files["safetensors"]))
    scripted = torch.jit.script(DetectorLikeEDM(net).eval())
    torch.jit.save(scripted, str(files["torchscript"]))
    files["pickle"].write_bytes(pickle.dumps(PickledTorchScript(files["torchscript"].read_bytes())))
    return net, files


def test_state_dict_formats_load_the_same_weights(weights):
    net, files = weights
    expected = net.state_dict()
    for kind in ("state_dict", "legacy", "safetensors"):
        detector = load_inception(files[kind])
        assert isinstance(detector, PytorchFIDDetector), kind
        assert "pytorch-fid" in detector.pipeline and "299" in detector.pipeline
        loaded = detector.net.state_dict()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected if not k.endswith("num_batches_tracked"))


def test_network_outputs_and_both_pipelines_agree(weights):
    """Output widths 2048 / 1008, pytorch-fid's pipeline step by step, and the TorchScript path on the same weights."""
    net, files = weights
    image = torch.randint(0, 256, (1, 3, 32, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = F.interpolate(image.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    with torch.no_grad():
        features, logits = net(x)
    assert features.shape == (1, 2048) and logits.shape == (1, 1008)
    assert torch.isfinite(features).all() and features.std() > 0  # a random net still tells pixels apart

    from_state = load_inception(files["state_dict"])(image, with_class_probs=True)
    torch.testing.assert_close(from_state.features, features, rtol=1e-4, atol=1e-4)
    expected_probs = torch.softmax(logits - net.fc.bias, dim=1)  # IS uses the logits without the output bias
    torch.testing.assert_close(from_state.class_probs, expected_probs, rtol=1e-4, atol=1e-6)

    scripted = load_inception(files["torchscript"])
    assert isinstance(scripted, TorchScriptDetector) and "TorchScript" in scripted.pipeline
    from_script = scripted(image, with_class_probs=True)
    torch.testing.assert_close(from_script.features, from_state.features, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(from_script.class_probs, from_state.class_probs, rtol=1e-4, atol=1e-6)


def test_edm_style_pickle_loads_as_a_torchscript_detector(weights):
    _, files = weights
    detector = load_inception(files["pickle"])
    assert isinstance(detector, TorchScriptDetector)
    assert "pickle" in detector.format


def test_wrong_files_are_refused_with_a_reason(tmp_path, weights):
    net, _ = weights
    torchvision_like = dict(net.state_dict())
    torchvision_like["fc.weight"] = torch.zeros(1000, 2048)
    torchvision_like["fc.bias"] = torch.zeros(1000)
    torch.save(torchvision_like, tmp_path / "imagenet.pth")
    with pytest.raises(EvalError, match="torchvision"):
        load_inception(tmp_path / "imagenet.pth")
    partial = {k: v for k, v in net.state_dict().items() if not k.startswith("Mixed_7c")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(EvalError, match="missing"):
        load_inception(tmp_path / "partial.pth")
    (tmp_path / "junk.pth").write_bytes(b"not weights at all")
    with pytest.raises(EvalError, match="cannot read"):
        load_inception(tmp_path / "junk.pth")
    with pytest.raises(EvalError, match="does not exist"):
        load_inception(tmp_path / "absent.pth")


def test_weights_file_is_found_from_flag_environment_or_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert find_inception_file(None) is None
    message = missing_weights_message()
    for needle in ("--inception", ENV_VAR, str(tmp_path / "cache" / "patchdiffusion"),
                   "pt_inception-2015-12-05-6726825d.pth", "inception-2015-12-05.pkl", "swd"):
        assert needle in message
    cached = tmp_path / "cache" / "patchdiffusion" / "inception-2015-12-05.pkl"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert find_inception_file(None) == cached
    from_env = tmp_path / "env.pth"
    from_env.write_bytes(b"")
    monkeypatch.setenv(ENV_VAR, str(from_env))
    assert find_inception_file(None) == from_env
    assert find_inception_file(str(cached)) == cached  # the flag wins
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "missing.pth"))
    with pytest.raises(EvalError, match=ENV_VAR):
        find_inception_file(None)


# ------------------------------------------------------------------------------------------------
# EDM's pickle through the restricted unpickler; sha256 of every accepted file.


def persistence_pickle(monkeypatch, marker, state) -> bytes:
    """A pickle shaped like dnnlib's persistence output: torch_utils.persistence._reconstruct_persistent_obj(meta),
    whose meta carries Python source (here: code that would write `marker` if it were run) and the state."""
    import sys
    import types

    package, module = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("only used to be named in the pickle")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    monkeypatch.setitem(sys.modules, "torch_utils", package)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", module)
    meta = {
        "type": "class", "version": 6, "class_name": "InceptionDetector", "state": state,
        "module_src": f"open({str(marker)!r}, 'w').write('ran')\nclass InceptionDetector:\n    pass\n",
    }

    class Persistent:
        def __reduce__(self):
            return _reconstruct_persistent_obj, (meta,)

    return pickle.dumps(Persistent(), protocol=2)


@pytest.mark.parametrize("holds", ["torchscript", "archive bytes"])
def test_edm_persistence_pickle_loads_without_running_its_source(tmp_path, monkeypatch, weights, holds):
    _, files = weights
    archive = files["torchscript"].read_bytes()
    model = PickledTorchScript(archive) if holds == "torchscript" else archive
    marker = tmp_path / "source-was-run"
    path = tmp_path / "inception-2015-12-05.pkl"
    path.write_bytes(persistence_pickle(monkeypatch, marker, {"model": model, "training": False}))
    detector = load_inception(path, warn=False)
    assert isinstance(detector, TorchScriptDetector) and "pickle" in detector.format
    assert not marker.exists()
    image = torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8)
    expected = load_inception(files["torchscript"], warn=False)(image).features
    torch.testing.assert_close(detector(image).features, expected)


def test_persistence_pickle_without_torchscript_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "source-was-run"
    path = tmp_path / "inception-2015-12-05.pkl"
    path.write_bytes(persistence_pickle(monkeypatch, marker, {"weights": [1.0, 2.0]}))
    with pytest.raises(EvalError, match="Python class 'InceptionDetector' whose code is stored in the pickle"):
        load_inception(path, warn=False)
    assert not marker.exists()


class RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


class EvaluatesCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w')",)


@pytest.mark.parametrize("payload", [RunsAShellCommand, EvaluatesCode])
def test_pickle_naming_anything_else_is_refused_before_running_it(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "inception-2015-12-05.pkl"
    path.write_bytes(pickle.dumps({"detector": payload(marker)}))
    with pytest.raises(EvalError, match="refused to load .* the pickle refers to .*(system|eval).*nothing was run"):
        load_inception(path, warn=False)
    assert not marker.exists()


def test_unpublished_weights_load_with_a_loud_warning(weights):
    from patchdiffusion.eval.detectors import UnverifiedInceptionWarning, _file_sha256

    _, files = weights
    for kind in ("state_dict", "safetensors", "torchscript", "pickle"):
        with pytest.warns(UnverifiedInceptionWarning, match="NOT comparable with published figures"):
            detector = load_inception(files[kind])
        assert detector.published_as is None and detector.sha256 == _file_sha256(files[kind])
        assert detector.warning.startswith("WARNING: Inception weights") and detector.sha256[:16] in detector.warning


def test_a_file_with_a_published_sha256_loads_quietly(weights, monkeypatch):
    import warnings

    from patchdiffusion.eval import detectors

    _, files = weights
    digest = detectors._file_sha256(files["legacy"])
    monkeypatch.setitem(detectors.PUBLISHED_SHA256, digest, "pytorch-fid pt_inception-2015-12-05-6726825d.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error", detectors.UnverifiedInceptionWarning)
        detector = load_inception(files["legacy"])
    assert detector.published_as == "pytorch-fid pt_inception-2015-12-05-6726825d.pth" and detector.warning is None


def test_published_digest_agrees_with_the_file_name():
    """torch.hub names a file after the start of its sha256: pt_inception-2015-12-05-6726825d.pth."""
    from patchdiffusion.eval.detectors import PUBLISHED_SHA256

    names = {name: digest for digest, name in PUBLISHED_SHA256.items()}
    digest = names["pytorch-fid pt_inception-2015-12-05-6726825d.pth"]
    assert len(digest) == 64 and digest.startswith("6726825d")
