"""Out-of-core canvases: stores, lazy arrays, block noise, the resumable driver, streamed output.

The reference everywhere is the plain tensor computation: a canvas sampled in RAM or on disk through
lazy CanvasArrays must equal the same sampler run eagerly on tensors, bit for bit, and a job killed
with SIGKILL and rerun must equal an uninterrupted one.
"""

from __future__ import annotations

import gc
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchdiffusion import canvas as canvas_module
from patchdiffusion.canvas import (
    BLOCK,
    STORE_COUNT,
    BlockNoise,
    CanvasArray,
    CanvasError,
    CanvasSpace,
    DiskStore,
    MemoryStore,
    canvases_alive,
    choose_storage,
    sample_canvas,
    tiled_decode,
    write_png,
    write_png_strips,
    write_tiff,
    write_tiff_strips,
)
from patchdiffusion.diffusion import edm_sigmas
from patchdiffusion.diffusion.samplers import get_sampler
from patchdiffusion.diffusion.tiled import TiledDenoiser, TilingConfig, TilingError
from patchdiffusion.images import to_uint8

from test_tiled import SAMPLER_CASES, ConvTiles


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # Disk sampling fixes glibc's mmap threshold for the whole process; keep the test session as it is.
    monkeypatch.setattr(canvas_module, "bound_malloc_heap", lambda: None)
    yield
    torch.set_num_threads(threads)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


# ----------------------------------------------------------------------------------------------
# Stores and lazy arrays.


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_store_regions_across_blocks(storage, tmp_path):
    space = CanvasSpace(None if storage == "memory" else str(tmp_path))
    shape = (2, 3, 300, 170)  # edge blocks of 44 x 42 pixels
    reference = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    store = space.new_store(shape)
    store.write(0, 0, 300, 0, 170, reference[0])
    store.write(1, 100, 300, 20, 170, reference[1, :, 100:, 20:])  # partial blocks: through the cache
    store.write(1, 0, 100, 0, 170, reference[1, :, :100])
    store.write(1, 100, 300, 0, 20, reference[1, :, 100:, :20])
    store.add(1, 120, 250, 90, 140, torch.ones(3, 130, 50))
    store.finish()
    expected = reference.clone()
    expected[1, :, 120:250, 90:140] += 1
    for region in [(0, 0, 300, 0, 170), (1, 5, 299, 3, 169), (1, 127, 129, 127, 129), (0, 256, 300, 128, 170)]:
        b, y0, y1, x0, x1 = region
        assert torch.equal(store.read(*region), expected[b, :, y0:y1, x0:x1])
    if storage == "disk":
        assert os.fstat(store.fd).st_size == 4 * reference.numel()
        assert store.path is None and not list(tmp_path.iterdir())  # anonymous: nothing left if killed
    with pytest.raises(RuntimeError, match="immutable"):
        store.write(0, 0, 1, 0, 1, torch.zeros(3, 1, 1))


def test_named_disk_store_is_removed_when_collected(tmp_path):
    store = DiskStore((1, 1, 8, 8), tmp_path, named=True)
    path = Path(store.path)
    assert path.exists()
    del store
    gc.collect()
    assert not path.exists()


def test_canvas_array_arithmetic_matches_eager_torch_bit_for_bit(tmp_path):
    generator = torch.Generator().manual_seed(0)
    a_t, b_t = torch.randn(2, 3, 200, 150, generator=generator), torch.rand(2, 3, 200, 150, generator=generator) + 0.5
    space = CanvasSpace(str(tmp_path))
    a, b = CanvasArray.from_tensor(a_t, space), CanvasArray.from_tensor(b_t, space)
    cases = [
        (lambda u, v: 0.7 * (u - v) / 0.3 + v, None),
        (lambda u, v: 1 - u / v, None),
        (lambda u, v: 2.5 / v - -u, None),  # scalar / tensor is reciprocal(v) * 2.5 in torch
        (lambda u, v: (u * 0.4 + (1 - u) * -1.3).exp(), None),
        (lambda u, v: v.sqrt() * u, None),
        (lambda u, v: u.clamp(-0.5, 0.5) + v.clamp(max=1.0), None),
    ]
    for expression, _ in cases:
        lazy = expression(a, b)
        assert not lazy.is_materialized
        assert torch.equal(bits(lazy.tensor()), bits(expression(a_t, b_t)))
    assert a.to(torch.float32, "cpu") is a and a.dtype == torch.float32
    with pytest.raises(TypeError):
        a.to(torch.float64)


def test_materialize_replaces_the_tree_and_frees_its_stores(tmp_path):
    space = CanvasSpace(str(tmp_path), named=True)
    a = CanvasArray.from_tensor(torch.ones(1, 3, 64, 64), space)
    b = CanvasArray.from_tensor(torch.full((1, 3, 64, 64), 2.0), space)
    assert len(list(tmp_path.iterdir())) == 2
    c = (a + b) * 0.5
    del a, b
    gc.collect()
    assert len(list(tmp_path.iterdir())) == 2  # still needed by c
    c.materialize()
    gc.collect()
    assert c.is_materialized and len(list(tmp_path.iterdir())) == 1  # a and b's files are gone
    assert torch.equal(c.tensor(), torch.full((1, 3, 64, 64), 1.5))


# ----------------------------------------------------------------------------------------------
# Block noise.


def test_block_noise_does_not_depend_on_chunking_storage_batch_or_canvas_size(tmp_path):
    shape = (2, 3, 96, 160)
    noise = BlockNoise([11, 12])
    as_tensor = noise(torch.zeros(shape), 4)
    assert as_tensor.shape == shape and abs(as_tensor.std().item() - 1) < 0.02
    for space in (CanvasSpace(), CanvasSpace(str(tmp_path))):
        lazy = BlockNoise([11, 12])(CanvasArray.full(shape, 0.0, space), 4)
        assert torch.equal(lazy.tensor(), as_tensor)
    chunk = BlockNoise([11, 12]).region(1, 3, 30, 90, 100, 150, noise_key(4))  # any chunk of canvas 1
    assert torch.equal(chunk, as_tensor[1, :, 30:90, 100:150])
    alone = BlockNoise([12])(torch.zeros(1, 3, 96, 160), 4)  # canvas 1 alone in its batch
    assert torch.equal(alone[0], as_tensor[1])
    larger = BlockNoise([12])(torch.zeros(1, 3, 300, 200), 4)  # a larger canvas extends it
    assert torch.equal(larger[0, :, :96, :160], as_tensor[1])
    assert not torch.equal(BlockNoise([11, 12])(torch.zeros(shape), 5), as_tensor)  # another step
    twice = BlockNoise([11, 12])
    assert not torch.equal(twice(torch.zeros(shape), 4), twice(torch.zeros(shape), 4))  # a second draw in a step
    assert torch.equal(BlockNoise(7)(torch.zeros(shape), 0), BlockNoise(7)(torch.zeros(shape), 0))


def noise_key(step):
    return (canvas_module._STEP_STREAM, step, 0)


# ----------------------------------------------------------------------------------------------
# The driver: every sampler, in RAM, on disk and on tensors.


def tensor_reference(name, options, model, config, shape, sigmas, seeds):
    """The sampler run eagerly on tensors with the same block noise."""
    noise = BlockNoise(seeds)
    x = noise.start(torch.zeros(shape)) * float(sigmas[0])
    return get_sampler(name)(TiledDenoiser(model, config), x, sigmas, noise_fn=noise, **options)


@pytest.mark.parametrize("name, options", SAMPLER_CASES, ids=[f"{n}-{o}" for n, o in SAMPLER_CASES])
def test_disk_equals_memory_equals_tensors_bit_for_bit(name, options, tmp_path):
    model = ConvTiles(tile=(32, 48), learned_variance=options.get("variance") == "learned")
    config = TilingConfig(overlap=(8, 12), grid="random", batch=3)
    shape, sigmas, seeds = (2, 3, 96, 160), edm_sigmas(5), [4, 9]
    results = {}
    for storage in ("memory", "disk"):
        gc.collect()
        STORE_COUNT["peak"] = before = STORE_COUNT["live"]
        result = sample_canvas(name, TiledDenoiser(model, config), shape, sigmas, seeds=seeds, options=options,
                               storage=storage, folder=tmp_path)
        assert STORE_COUNT["peak"] - before <= canvases_alive(name, options)  # the estimate behind storage=auto
        assert result.storage == storage and result.steps == 5 and result.tiles > 0
        results[storage] = result.canvas.tensor()
    assert torch.equal(bits(results["memory"]), bits(results["disk"]))
    reference = tensor_reference(name, options, model, config, shape, sigmas, seeds)
    assert torch.equal(bits(results["memory"]), bits(reference))
    assert not list(tmp_path.iterdir())


def test_storage_choice_and_disk_space_checks(tmp_path, monkeypatch):
    monkeypatch.setattr(canvas_module, "available_memory_bytes", lambda: 100 * 2**20)
    small, large = (1, 3, 256, 256), (1, 3, 4096, 4096)
    assert choose_storage(small, "ddim") == "memory" and choose_storage(large, "ddim") == "disk"
    assert choose_storage(large, "ddim", storage="memory") == "memory"
    with pytest.raises(CanvasError, match="auto, memory or disk"):
        choose_storage(small, "ddim", storage="ram")
    monkeypatch.setattr(canvas_module, "free_disk_bytes", lambda folder: 10 * 2**20)
    denoiser = TiledDenoiser(ConvTiles(tile=(32, 32)))
    with pytest.raises(CanvasError, match="not enough disk space") as error:
        sample_canvas("ddim", denoiser, (1, 3, 2048, 2048), edm_sigmas(2), storage="disk", folder=tmp_path)
    assert "\n" not in str(error.value) and denoiser.tiles_done == 0
    with pytest.raises(TilingError, match="smaller than"):  # before any work too
        sample_canvas("ddim", denoiser, (1, 3, 16, 64), edm_sigmas(2), storage="memory")


def test_a_resumed_job_counts_its_own_files_as_space(tmp_path, monkeypatch):
    """The disk check of a rerun credits what the job folder already holds (its checkpoint becomes x, the
    rest is removed): a job that fitted when it started is not refused on resume."""
    from patchdiffusion.canvas import allocated_bytes

    job = tmp_path / "job"
    (job / "scratch").mkdir(parents=True)
    (job / "scratch" / "a.f32").write_bytes(b"\1" * 2**20)
    (job / "step-000001").mkdir()
    os.link(job / "scratch" / "a.f32", job / "step-000001" / "x.f32")  # a hard link counts once
    held = allocated_bytes(job)
    assert 2**20 <= held < 2**20 + 2**16
    shape, sigmas = (1, 3, 256, 256), edm_sigmas(2)
    canvas_bytes = 3 * 256 * 256 * 4
    denoiser = TiledDenoiser(ConvTiles(tile=(32, 32)))
    # ddim on disk with a job: 5 canvases (x, denoised, the result, a checkpoint's x and its successor).
    free = 5 * canvas_bytes - held // 2
    monkeypatch.setattr(canvas_module, "free_disk_bytes", lambda folder: free)
    with pytest.raises(CanvasError, match="not enough disk space"):
        sample_canvas("ddim", denoiser, shape, sigmas, storage="disk", job=tmp_path / "fresh")
    monkeypatch.setattr(canvas_module, "_Job", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("checked")))
    with pytest.raises(RuntimeError, match="checked"):  # the space check passed: the job would open now
        sample_canvas("ddim", denoiser, shape, sigmas, storage="disk", job=job)


# ----------------------------------------------------------------------------------------------
# Resumable jobs.

JOB_SCRIPT = textwrap.dedent('''
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from test_tiled import ConvTiles
    from patchdiffusion.canvas import sample_canvas
    from patchdiffusion.diffusion import edm_sigmas
    from patchdiffusion.diffusion.tiled import TiledDenoiser, TilingConfig

    class Slow(ConvTiles):
        def __call__(self, *args, **kwargs):
            time.sleep(self.pause)
            return super().__call__(*args, **kwargs)

    def run_job(job, out, pause, sampler="dpmpp_2m"):
        torch.set_num_threads(1)
        model = Slow(tile=(32, 32))
        model.pause = pause
        denoiser = TiledDenoiser(model, TilingConfig(overlap=(8, 8), grid="random", batch=4))
        return sample_canvas(sampler, denoiser, (1, 3, 64, 96), edm_sigmas(12), seeds=[3], storage="disk",
                             job=job, checkpoint_every=1, job_key="toy", save=lambda c: torch.save(c.tensor(), out))

    if __name__ == "__main__":
        run_job(sys.argv[1], sys.argv[2], float(sys.argv[3]))
''')


def test_a_job_killed_and_rerun_equals_an_uninterrupted_run(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(JOB_SCRIPT.format(tests=str(Path(__file__).parent)))
    namespace: dict = {}
    exec(compile(script.read_text(), str(script), "exec"), namespace)
    namespace["run_job"](tmp_path / "reference-job", tmp_path / "reference.pt", 0.0)
    reference = torch.load(tmp_path / "reference.pt")
    assert not (tmp_path / "reference-job").exists()  # removed once the output is written

    job = tmp_path / "job"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, str(script), str(job), str(tmp_path / "out.pt"), "0.02"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not [p for p in job.glob("step-*") if p.suffix != ".tmp"]:  # a first checkpoint is written
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.3))
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert job.exists() and not (tmp_path / "out.pt").exists()
    (job / "step-999999.tmp").mkdir()  # a stale temp, as a kill during a checkpoint leaves
    result = namespace["run_job"](job, tmp_path / "out.pt", 0.0)
    assert result.resumed_from is not None and result.resumed_from > 0 and result.steps < 12
    assert torch.equal(bits(torch.load(tmp_path / "out.pt")), bits(reference))
    assert not job.exists()


@pytest.mark.parametrize("name", ["ddim", "heun"])
def test_resume_from_a_checkpoint_in_process(name, tmp_path):
    """Stop a job by raising from the save hook: rerun, it starts from the final checkpoint; a job
    stopped mid-way (an exception in the model) resumes from its last step."""
    calls = {"n": 0}

    class Failing(ConvTiles):
        fail_at = None

        def __call__(self, *args, **kwargs):
            calls["n"] += 1
            if self.fail_at is not None and calls["n"] == self.fail_at:
                raise KeyboardInterrupt
            return super().__call__(*args, **kwargs)

    model = Failing(tile=(32, 32))
    options = dict(S_churn=5.0) if name == "heun" else dict(eta=0.5)

    def run(job, storage="memory"):
        return sample_canvas(name, TiledDenoiser(model, TilingConfig(overlap=(8, 8))), (1, 3, 48, 64), edm_sigmas(6),
                             seeds=[5], options=options, storage=storage, job=job, checkpoint_every=2)

    reference = run(None).canvas.tensor()
    model.fail_at = calls["n"] + calls["n"] * 3 // 4  # three quarters of the way through
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "job")
    assert [p.name for p in (tmp_path / "job").glob("step-*")]
    model.fail_at = None
    resumed = run(tmp_path / "job", storage="disk")  # checkpoints do not depend on the storage
    assert resumed.resumed_from in (2, 4)
    assert torch.equal(bits(resumed.canvas.tensor()), bits(reference))
    # Other parameters in the same folder: one clear line, nothing touched.
    (tmp_path / "job2").mkdir()
    (tmp_path / "job2" / "job.json").write_text('{"digest": "other"}')
    with pytest.raises(CanvasError, match="other parameters"):
        run(tmp_path / "job2")


# ----------------------------------------------------------------------------------------------
# Streamed output and tiled decoding.


@pytest.mark.parametrize("storage", ["memory", "disk", "tensor"])
def test_png_and_tiff_streams_round_trip_to_uint8(storage, tmp_path):
    import tifffile

    values = torch.randn(2, 3, 300, 170, generator=torch.Generator().manual_seed(0)) * 0.7
    values[0, :, 0, 0] = torch.tensor([-1.2, 1.0, -0.0])  # clipping and the rounding edges
    values[0, :, 0, 1] = torch.tensor([127.5 / 127.5 - 1, -128 / 127.5, 0.5 / 127.5])
    canvas = values if storage == "tensor" else CanvasArray.from_tensor(
        values, CanvasSpace(None if storage == "memory" else str(tmp_path)))
    expected = to_uint8(values[1:2])[0]  # (H, W, 3)
    png = write_png(tmp_path / "a.png", canvas, index=1, rows=64)
    assert np.array_equal(np.asarray(Image.open(png)), expected)
    tif = write_tiff(tmp_path / "a.tif", canvas, index=1, tile=128, compression="zlib")
    assert np.array_equal(tifffile.imread(tif), expected)
    with tifffile.TiffFile(tif) as f:
        assert f.is_bigtiff and f.pages[0].is_tiled
    strips = (values[1, :, y:y + 37] for y in range(0, 300, 37))
    assert np.array_equal(tifffile.imread(write_tiff_strips(tmp_path / "b.tif", strips, 300, 170, tile=128)), expected)
    strips = (values[1, :, y:y + 37] for y in range(0, 300, 37))
    assert np.array_equal(np.asarray(Image.open(write_png_strips(tmp_path / "b.png", strips, 300, 170))), expected)
    assert not list(tmp_path.glob("*.tmp"))


def toy_decoder(weight: torch.Tensor, factor: int):
    """A linear map of channels followed by nearest upsampling: (N, 4, h, w) -> (N, 3, h f, w f)."""
    def decode(z):
        return torch.nn.functional.interpolate(torch.einsum("oc,nchw->nohw", weight, z), scale_factor=factor)
    return decode


@pytest.mark.parametrize("source", ["tensor", "disk"])
def test_tiled_decode(source, tmp_path):
    weight = torch.randn(3, 4, generator=torch.Generator().manual_seed(1)) * 0.3
    latent_t = torch.randn(1, 4, 20, 36, generator=torch.Generator().manual_seed(2))
    latent = latent_t if source == "tensor" else CanvasArray.from_tensor(latent_t, CanvasSpace(str(tmp_path)))
    decode = toy_decoder(weight, 8)
    whole = decode(latent_t)[0]
    one = torch.cat(list(tiled_decode(decode, latent, 8, tile=(20, 36), overlap=4)), dim=1)
    assert torch.equal(bits(one), bits(whole))  # one tile covering the latent: decode_fn of the whole
    strips = list(tiled_decode(decode, latent, 8, tile=(8, 12), overlap=(2, 4), window="linear", batch=2))
    assert max(s.shape[1] for s in strips) <= 8 * 8  # memory bounded by a band of tile rows
    torch.testing.assert_close(torch.cat(strips, dim=1), whole, rtol=1e-5, atol=1e-5)  # a per-pixel decoder
    out = write_png_strips(tmp_path / "d.png", tiled_decode(decode, latent, 8, tile=(8, 12), overlap=2), 160, 288)
    assert np.array_equal(np.asarray(Image.open(out)), to_uint8(whole[None])[0])


def blurring_decoder(weight: torch.Tensor, factor: int):
    """toy_decoder after a 3×3 box blur with zero padding: each pixel depends on its neighbours, and the
    canvas edges meet zeros, as a VAE decoder's convolutions do."""
    def decode(z):
        box = torch.ones(z.shape[1], 1, 3, 3, dtype=z.dtype) / 9
        return toy_decoder(weight, factor)(torch.nn.functional.conv2d(z, box, padding=1, groups=z.shape[1]))
    return decode


def test_tiled_decode_of_a_wrapped_latent_tiles_with_itself():
    weight = torch.randn(3, 4, generator=torch.Generator().manual_seed(1)) * 0.3
    latent = torch.randn(1, 4, 20, 36, generator=torch.Generator().manual_seed(2))
    decode = blurring_decoder(weight, 4)
    # The reference: the decoder run on the torus itself (circular padding), cut back to the latent's size.
    margin = 4
    torus = decode(torch.nn.functional.pad(latent, (margin,) * 4, mode="circular"))[0]
    torus = torus[:, margin * 4:(margin + 20) * 4, margin * 4:(margin + 36) * 4]
    one = torch.cat(list(tiled_decode(decode, latent, 4, tile=(64, 64), overlap=2, wrap=True)), dim=1)
    assert one.shape == (3, 80, 144) and torch.equal(one, torus)  # one tile over the extended latent: exact
    strips = list(tiled_decode(decode, latent, 4, tile=(8, 12), overlap=(4, 4), wrap=True, batch=3))
    wrapped = torch.cat(strips, dim=1)
    assert wrapped.shape == (3, 80, 144) and max(s.shape[1] for s in strips) <= 8 * 4
    plain = torch.cat(list(tiled_decode(decode, latent, 4, tile=(8, 12), overlap=(4, 4))), dim=1)
    edges = [slice(0, 4), slice(-4, None)]  # the image rows and columns of the latent's first and last pixels
    interior = slice(4, -4)

    def worst(image, rows, cols):
        return float((image - torus)[:, rows, cols].abs().max())

    # Wrapped: the edges are as close to the torus decode as the tile joints inside are (blending).
    joints = worst(wrapped, interior, interior)
    assert max(worst(wrapped, e, slice(None)) for e in edges) <= joints + 1e-6
    assert max(worst(wrapped, slice(None), e) for e in edges) <= joints + 1e-6
    # Decoded as a plain canvas, the edges meet the zero padding: far from the torus.
    assert max(worst(plain, e, slice(None)) for e in edges) > 5 * joints
