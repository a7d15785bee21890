"""The layout holds: generic modules name no method, the diffusion identities live once, imports only
go downwards, and an option nobody takes is a one-line error."""

import ast
import re
from pathlib import Path

import pytest
import torch

import patchdiffusion
from conftest import TINY_METHODS, batch_of, tiny_method
from patchdiffusion.diffusion import parameterization
from patchdiffusion.errors import ConfigError
from patchdiffusion.registry import method_names
from patchdiffusion.rng import SampleRNG

PACKAGE = Path(patchdiffusion.__file__).parent
GENERIC = ["cli.py", "train.py", "sample.py", "presets.py", "eval", "compare.py"]


def python_files(*names: str) -> list[Path]:
    files = []
    for name in names:
        path = PACKAGE / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def test_generic_modules_name_no_method():
    """cli.py, train.py, sample.py, presets.py, eval/ and compare.py know no method by name."""
    patterns = {}
    for name in method_names():
        # "full" is an English word: only its use as a name (a quoted string) counts.
        patterns[name] = re.compile(r"[\"']full[\"']") if name == "full" else re.compile(
            rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", re.IGNORECASE)
    patterns["patch-dm / dimr spelt otherwise"] = re.compile(r"patch-?dm|patchdm", re.IGNORECASE)
    found = []
    for path in python_files(*GENERIC):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for name, pattern in patterns.items():
                if pattern.search(line):
                    found.append(f"{path.relative_to(PACKAGE)}:{number}: {name}: {line.strip()}")
    assert not found, "\n".join(found)


# ------------------------------------------------------------------------------------------------
# imports only go downwards

LAYERS = [  # (layer, module prefixes); a module may import its own layer or lower ones
    (0, ["errors", "registry", "rng", "images", "process_memory"]),
    (1, ["config", "runtime"]),
    (2, ["nets", "diffusion", "data", "latent", "run", "eval.errors", "eval.frechet", "eval.kid", "eval.swd",
         "eval.seam", "eval.precision_recall", "eval.inception", "eval.inception_score", "eval.features",
         "eval.detectors", "eval.reference", "eval.monitor"]),
    (3, ["methods", "canvas"]),
    (4, ["sample", "train", "presets"]),
    (5, ["eval"]),  # the evaluation pipeline: it may sample from runs, never train
    (6, ["demo", "compare", "benchmarking"]),
    (7, ["cli", "__init__"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for layer, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = layer, len(prefix)
    assert best is not None, f"module '{module}' has no layer in tests/test_architecture.py LAYERS"
    return best


def short(target: str) -> str:
    """patchdiffusion.x.y -> x.y (the package itself -> __init__)."""
    return target[len("patchdiffusion."):] if target != "patchdiffusion" else "__init__"


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (module level and inside functions alike)."""
    modules = {module_name(p): p for p in python_files(".")}
    graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".") if package else []
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                    source = "patchdiffusion." + source if source else "patchdiffusion"
                else:
                    source = node.module
                # `from package import submodule` names the submodule; `from module import x` the module.
                targets = [f"{source}.{alias.name}" if short(f"{source}.{alias.name}") in modules else source
                           for alias in node.names]
            for target in targets:
                if not target.startswith("patchdiffusion"):
                    continue
                name = short(target)
                while name not in modules and "." in name:
                    name = name.rpartition(".")[0]
                if name in modules and name != module:
                    edges.add(name)
        graph[module] = edges
    return graph


def test_imports_go_downwards_and_have_no_cycles():
    graph = import_graph()
    upward = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
              for a, edges in graph.items() for b in edges if layer_of(b) > layer_of(a)]
    assert not upward, "\n".join(upward)
    assert not [b for a, edges in graph.items() if a.startswith("eval") for b in edges if b == "train"]
    # No cycles (iterative DFS colouring).
    state, cycles = {}, []
    for start in graph:
        stack = [(start, iter(sorted(graph[start])))]
        state[start] = "open"
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = "done"
                stack.pop()
            elif state.get(child) == "open":
                cycles.append(" -> ".join([n for n, _ in stack] + [child]))
            elif child not in state:
                state[child] = "open"
                stack.append((child, iter(sorted(graph.get(child, ())))))
    assert not cycles, "\n".join(cycles)


# ------------------------------------------------------------------------------------------------
# the diffusion identities are written once


@pytest.fixture
def spied_identities(monkeypatch):
    """Count every call of the parameterisation helpers (they still compute the same numbers)."""
    calls = {}
    for name in ("diffuse", "prediction_target", "x0_from_prediction", "edm_x0"):
        real = getattr(parameterization, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(parameterization, name, spy)
    return calls


@pytest.mark.parametrize("name", list(TINY_METHODS))
def test_every_method_trains_and_samples_through_the_helpers(name, spied_identities, monkeypatch):
    method, net = tiny_method(name)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    method.loss(net, batch_of(images), SampleRNG([1, 2]))
    assert spied_identities.get("diffuse", 0) >= 1, "the loss did not noise its images through diffuse()"
    edm = name in ("full", "patch_diffusion")
    if not edm:
        assert spied_identities.get("prediction_target", 0) >= 1, "the training target is not prediction_target()"
    spied_identities.clear()
    method.sample(net, SampleRNG([3]), steps=2)
    helper = "edm_x0" if edm else "x0_from_prediction"
    assert spied_identities.get(helper, 0) >= 1, f"sampling's x0 does not come from {helper}()"
    # And what the helper returns is what sampling uses: a helper that says "x0 = 0" gives zero images.
    poisoned = {"edm_x0": lambda x, *rest: torch.zeros_like(x),
                "x0_from_prediction": lambda prediction, x_t, *rest: torch.zeros_like(x_t)}[helper]
    monkeypatch.setattr(parameterization, helper, poisoned)
    out = method.sample(net, SampleRNG([3]), steps=2)
    assert out.abs().max() < 1e-6


# ------------------------------------------------------------------------------------------------
# an option nobody takes is one line


def test_misspelt_sampler_option_is_one_line_in_python():
    method, net = tiny_method("full")
    with pytest.raises(ConfigError, match=r"sampler 'heun' has no option 'S_churm' \(did you mean 'S_churn'\?\)"):
        method.sample(net, SampleRNG([0]), steps=2, sampler_options={"S_churm": 5})
    with pytest.raises(ConfigError, match="sampler 'heun' has no option 'eta'"):
        method.sample(net, SampleRNG([0]), steps=2, sampler_options={"eta": 0.5})
    with pytest.raises(ConfigError, match="no sampling option 'patch_batch'"):
        method.sample(net, SampleRNG([0]), steps=2, options={"patch_batch": 2})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from patchdiffusion.train import train
    from conftest import tiny_config

    run = tmp_path_factory.mktemp("arch") / "run"
    config = tiny_config("full", 16, "data.source=builtin:textures?count=4", "train.steps=1", "train.batch_size=2",
                         "train.sample_images=0", "train.device=cpu")
    train(config, run, progress=False, log=lambda *a: None)
    return run


def test_misspelt_sampler_option_is_one_line_in_the_api_and_cli(tiny_run, tmp_path, capsys):
    from patchdiffusion.cli import main
    from patchdiffusion.sample import generate_images

    with pytest.raises(ConfigError, match=r"unknown sampling option 'S_churm' \(did you mean 'S_churn'\?\)"):
        generate_images(tiny_run, tmp_path / "a", num=1, steps=2, progress=False, S_churm=5)
    for argv, expected in [
        (["--S_churm", "5"], "unknown argument '--S_churm' (did you mean '--S_churn'?)"),
        (["--eta", "0.5"], "unknown sampling option 'eta': sampler 'heun' takes S_churn, S_min, S_max, S_noise"),
        (["--code-from", "1"], "unknown sampling option 'code_from': sampler 'heun' takes"),
    ]:
        code = main(["sample", "--run", str(tiny_run), "--num", "1", "--steps", "2", "--out", str(tmp_path / "b"),
                     "--no-progress", *argv])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and err.count("\n") == 1, err


def test_sample_use_ema_is_read(tmp_path):
    """SampleConfig.use_ema decides which weights sampling loads unless the caller says."""
    from conftest import tiny_config
    from patchdiffusion.config import apply_overrides, load_config, save_config
    from patchdiffusion.run import latest_checkpoint, load_run, load_weights
    from patchdiffusion.train import train

    run = tmp_path / "run"
    config = tiny_config("full", 16, "data.source=builtin:textures?count=4", "train.steps=2", "train.batch_size=2",
                         "train.sample_images=0", "train.device=cpu", "train.ema_rampup=0", "train.warmup_steps=0")
    train(config, run, progress=False, log=lambda *a: None)  # no ramp-up: after 2 steps the EMA is not the net
    checkpoint = latest_checkpoint(run)
    ema, raw = load_weights(checkpoint, "ema"), load_weights(checkpoint, "net")
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    for use_ema, expected in ((True, ema), (False, raw)):
        save_config(apply_overrides(load_config(run / "config.yaml"), [f"sample.use_ema={use_ema}"]), run / "config.yaml")
        loaded = load_run(run, use_ema=None)
        assert all(torch.equal(v, expected[k]) for k, v in loaded.net.state_dict().items())
