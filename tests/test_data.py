"""Tests for the data layer: sources, transforms, conversion, the torch dataset."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchdiffusion.data import (
    BuiltinSource,
    DataError,
    FolderSource,
    ImageDataset,
    LmdbSource,
    ZipSource,
    center_crop_resize,
    convert_dataset,
    hflip,
    open_source,
    width_height,
    resize,
    to_rgb_uint8,
)


def _save_png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)


def _random_rgb(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.fixture
def png_folder(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A folder of RGB PNGs of mixed sizes in nested subfolders, with the pixels written."""
    rng = np.random.default_rng(0)
    root = tmp_path / "pngs"
    images = {
        "a.png": _random_rgb(rng, 12, 20),
        "cats/b.png": _random_rgb(rng, 16, 16),
        "cats/c.png": _random_rgb(rng, 9, 7),
        "dogs/deep/d.png": _random_rgb(rng, 5, 31),
    }
    for name, pixels in images.items():
        _save_png(root / name, pixels)
    return root, images


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".partial-" in p.name or ".old-" in p.name)


# ---------------------------------------------------------------------------------------------
# Conversion


def test_round_trip_folder_zip_lmdb_folder_keeps_every_pixel(tmp_path, png_folder):
    root, images = png_folder
    zip_summary = convert_dataset(root, tmp_path / "set.zip", progress=False)
    lmdb_summary = convert_dataset(tmp_path / "set.zip", tmp_path / "set.lmdb", progress=False)
    folder_summary = convert_dataset(tmp_path / "set.lmdb", tmp_path / "back", progress=False)
    assert zip_summary.written == lmdb_summary.written == folder_summary.written == len(images)
    assert not (zip_summary.skipped or lmdb_summary.skipped or folder_summary.skipped)

    with ZipSource(tmp_path / "set.zip") as zipped, LmdbSource(tmp_path / "set.lmdb") as stored:
        back = FolderSource(tmp_path / "back")
        for source in (zipped, stored, back):
            assert len(source) == len(images)
            names = [source.name_of(i) for i in range(len(source))]
            assert names == sorted(images)
            for i, name in enumerate(names):
                assert np.array_equal(source.read(i), images[name]), (source, name)
    # EDM's layout inside the zip.
    with zipfile.ZipFile(tmp_path / "set.zip") as archive:
        assert "00000/img00000000.png" in archive.namelist() and "dataset.json" in archive.namelist()
    assert _leftovers(tmp_path) == []


def test_round_trip_with_resolution_equal_to_native_size(tmp_path):
    rng = np.random.default_rng(1)
    pixels = {f"img{i}.png": _random_rgb(rng, 24, 40) for i in range(3)}
    for name, array in pixels.items():
        _save_png(tmp_path / "src" / name, array)
    convert_dataset(tmp_path / "src", tmp_path / "a.zip", resolution=(40, 24), progress=False)
    convert_dataset(tmp_path / "a.zip", tmp_path / "a.lmdb", resolution="40x24", progress=False)
    convert_dataset(tmp_path / "a.lmdb", tmp_path / "out", resolution=(40, 24), progress=False)
    back = FolderSource(tmp_path / "out")
    assert [back.name_of(i) for i in range(len(back))] == sorted(pixels)
    assert all(np.array_equal(back.read(i), pixels[back.name_of(i)]) for i in range(len(back)))


def test_convert_skips_bad_files_and_converts_odd_modes(tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / "messy"
    src.mkdir()
    (src / "x.png").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())  # not an image
    good_bytes = io.BytesIO()
    Image.fromarray(_random_rgb(rng, 64, 64)).save(good_bytes, format="PNG")
    (src / "truncated.png").write_bytes(good_bytes.getvalue()[: len(good_bytes.getvalue()) // 2])
    _save_png(src / "tiny.png", _random_rgb(rng, 1, 1))
    _save_png(src / "small.png", _random_rgb(rng, 20, 40))  # would need enlarging to 32x32
    sixteen = np.full((48, 48), 257 * 100, dtype=np.uint16)  # 16-bit 25700 is 8-bit 100
    sixteen[:, :16] = 65535
    sixteen[:, 16:32] = 1000  # 1000 * 255 / 65535 = 3.89 -> 4 (clipping would give 255)
    _save_png(src / "deep16.png", sixteen)
    assert Image.open(src / "deep16.png").mode == "I;16"
    _save_png(src / "gray.png", np.full((40, 40), 77, dtype=np.uint8))
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, :16, 3] = 255  # left half opaque red, right half fully transparent
    _save_png(src / "alpha.png", rgba)
    _save_png(src / "plain.png", _random_rgb(rng, 50, 70))

    dest = tmp_path / "out.zip"
    summary = convert_dataset(src, dest, resolution=width_height("32x32"), progress=False)

    assert summary.written == 4
    skipped = dict(summary.skipped)
    assert set(skipped) == {"x.png", "truncated.png", "tiny.png", "small.png"}
    assert "not an image" in skipped["x.png"]
    assert "truncated" in skipped["truncated.png"]
    assert "too small" in skipped["tiny.png"] and "too small" in skipped["small.png"]
    assert summary.converted_modes == {"I;16": 1, "L": 1, "RGBA": 1}
    text = str(summary)
    assert all(name in text for name in skipped)

    out = ZipSource(dest)
    by_name = {out.name_of(i): out.read(i) for i in range(len(out))}
    assert sorted(by_name) == ["alpha.png", "deep16.png", "gray.png", "plain.png"]
    assert all(image.shape == (32, 32, 3) and image.dtype == np.uint8 for image in by_name.values())
    deep = by_name["deep16.png"]
    # Columns away from the Lanczos ringing at the stripe borders keep the scaled values exactly.
    assert np.all(deep[:, 2:6] == 255) and np.all(deep[:, 13:19] == 4) and np.all(deep[:, 26:] == 100)
    assert np.all(by_name["gray.png"] == 77)
    assert np.array_equal(by_name["alpha.png"][0, 2], [200, 0, 0])
    assert np.array_equal(by_name["alpha.png"][0, 29], [255, 255, 255])  # transparent -> white
    assert sorted(p.name for p in tmp_path.iterdir()) == ["messy", "out.zip"]  # no temp files


def test_convert_refuses_existing_dest_and_writes_nothing_when_all_fail(tmp_path, png_folder):
    root, _ = png_folder
    dest = tmp_path / "out.lmdb"
    convert_dataset(root, dest, progress=False)
    with pytest.raises(DataError, match="already exists"):
        convert_dataset(root, dest, progress=False)
    summary = convert_dataset(root, dest, resolution=4, progress=False, overwrite=True)
    assert summary.written == 4 and LmdbSource(dest).read(0).shape == (4, 4, 3)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="no image"):
        convert_dataset(bad, tmp_path / "never.zip", progress=False)
    assert not (tmp_path / "never.zip").exists()
    assert _leftovers(tmp_path) == []


class _FailingSource:
    """Wraps a source and raises KeyboardInterrupt on one index, like a user pressing Ctrl-C."""

    def __init__(self, source, fail_at: int):
        self.source, self.fail_at = source, fail_at

    def __len__(self):
        return len(self.source)

    def __getattr__(self, name):
        return getattr(self.source, name)

    def read_decoded(self, index):
        if index == self.fail_at:
            raise KeyboardInterrupt
        return self.source.read_decoded(index)


@pytest.mark.parametrize("suffix", [".zip", ".lmdb", ""])
def test_interrupted_conversion_leaves_no_output(tmp_path, suffix):
    source = _FailingSource(BuiltinSource("textures", resolution=8, count=6), fail_at=4)
    dest = tmp_path / f"out{suffix}"
    with pytest.raises(KeyboardInterrupt):
        convert_dataset(source, dest, progress=False)
    assert list(tmp_path.iterdir()) == []


class _ReadOnlySource:
    """A minimal hand-written source: only the read interface, no read_decoded."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def name_of(self, index):
        return f"img{index}.png"

    def read(self, index):
        return self.images[index]

    def label_of(self, index):
        return None

    def close(self):
        pass


def test_convert_accepts_a_hand_written_source(tmp_path):
    images = [_random_rgb(np.random.default_rng(i), 6, 9) for i in range(2)]
    summary = convert_dataset(_ReadOnlySource(images), tmp_path / "out", progress=False)
    assert summary.written == 2
    assert np.array_equal(FolderSource(tmp_path / "out").read(1), images[1])


def test_convert_builtin_keeps_labels(tmp_path):
    convert_dataset("builtin:digits?count=30&seed=4", tmp_path / "digits.zip", resolution=16, progress=False)
    convert_dataset(tmp_path / "digits.zip", tmp_path / "digits.lmdb", progress=False)
    original = BuiltinSource("digits", 16, count=30, seed=4)
    for source in (ZipSource(tmp_path / "digits.zip"), LmdbSource(tmp_path / "digits.lmdb")):
        assert [source.label_of(i) for i in range(30)] == [original.label_of(i) for i in range(30)]
        assert np.array_equal(source.read(7), original.read(7))


def test_zip_and_lmdb_sources_survive_pickling(tmp_path, png_folder):
    root, images = png_folder
    convert_dataset(root, tmp_path / "s.zip", progress=False)
    convert_dataset(root, tmp_path / "s.lmdb", progress=False)
    for source in (ZipSource(tmp_path / "s.zip"), LmdbSource(tmp_path / "s.lmdb")):
        source.read(0)  # opens the handle; pickling must drop it
        clone = pickle.loads(pickle.dumps(source))
        assert np.array_equal(clone.read(1), images[source.name_of(1)])
        clone.close()
        source.close()


def test_dataloader_workers_read_lmdb_and_zip_opened_in_parent(tmp_path):
    convert_dataset("builtin:textures?count=16", tmp_path / "t.lmdb", resolution=8, progress=False)
    convert_dataset(tmp_path / "t.lmdb", tmp_path / "t.zip", progress=False)
    for spec in ("t.lmdb", "t.zip"):
        dataset = ImageDataset(open_source(tmp_path / spec), resolution=8)
        expected = torch.stack([dataset[i][0] for i in range(16)])  # the parent has the file open now
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, multiprocessing_context="fork")
        assert torch.equal(torch.cat([images for images, _ in loader]), expected)
        assert torch.equal(dataset[3][0], expected[3])  # and the parent still reads after the workers


def test_zip_source_reads_edm_dataset_tool_zip(tmp_path):
    rng = np.random.default_rng(5)
    pixels = [_random_rgb(rng, 8, 8) for _ in range(3)]
    with zipfile.ZipFile(tmp_path / "edm.zip", "w") as archive:
        for index, array in enumerate(pixels):
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="PNG")
            archive.writestr(f"00000/img{index:08d}.png", buffer.getvalue())
        labels = [[f"00000/img{index:08d}.png", label] for index, label in enumerate([4, 0, 9])]
        archive.writestr("dataset.json", json.dumps({"labels": labels}))
    source = open_source(tmp_path / "edm.zip")
    assert [source.name_of(i) for i in range(3)] == [f"00000/img{i:08d}.png" for i in range(3)]
    assert [source.label_of(i) for i in range(3)] == [4, 0, 9]
    assert all(np.array_equal(source.read(i), pixels[i]) for i in range(3))


def test_lmdb_source_reads_patch_dm_jpeg_layout(tmp_path):
    import lmdb

    rng = np.random.default_rng(3)
    path = tmp_path / "patchdm.lmdb"
    environment = lmdb.open(str(path), map_size=1 << 24)
    with environment.begin(write=True) as transaction:
        for index in range(3):
            buffer = io.BytesIO()
            Image.fromarray(_random_rgb(rng, 16, 16)).save(buffer, format="JPEG", quality=100)
            transaction.put(f"{index:07d}".encode(), buffer.getvalue())
        transaction.put(b"length", b"3")
    environment.close()
    source = open_source(path)
    assert isinstance(source, LmdbSource) and len(source) == 3
    assert source.read(2).shape == (16, 16, 3) and source.label_of(0) is None
    assert source.name_of(1) == "0000001.png"


# ---------------------------------------------------------------------------------------------
# Sources


@pytest.mark.parametrize("name", ["textures", "photos", "digits"])
def test_builtin_sets_are_deterministic_and_well_formed(name):
    first = BuiltinSource(name, resolution=(24, 16), count=12, seed=3)
    again = BuiltinSource(name, resolution=(24, 16), count=12, seed=3)
    other = BuiltinSource(name, resolution=(24, 16), count=12, seed=4)
    assert len(first) == 12
    images = [first.read(i) for i in range(12)]
    assert all(image.shape == (16, 24, 3) and image.dtype == np.uint8 for image in images)
    assert all(np.array_equal(image, again.read(i)) for i, image in enumerate(images))
    assert any(not np.array_equal(image, other.read(i)) for i, image in enumerate(images))
    assert all(image.std() > 2 for image in images)  # real pictures, not flat fields
    labels = [first.label_of(i) for i in range(12)]
    assert all(isinstance(label, int) and label >= 0 for label in labels)


def test_builtin_digits_labels_and_count():
    digits = BuiltinSource("digits", resolution=32, seed=0)
    assert len(digits) == 1797
    assert {digits.label_of(i) for i in range(len(digits))} == set(range(10))
    with pytest.raises(DataError):
        BuiltinSource("digits", count=5000)
    image = digits.read(0)
    assert np.array_equal(image[..., 0], image[..., 1])  # gray as RGB


def test_textures_are_colour_families():
    textures = BuiltinSource("textures", resolution=32, count=10, seed=0)
    brick, grass = textures.read(0), textures.read(1)  # families in table order
    assert brick[..., 0].mean() > brick[..., 2].mean() + 40  # red brick
    assert grass[..., 1].mean() > grass[..., 0].mean() + 20  # green grass


def test_open_source_dispatches_on_each_spec_form(tmp_path, png_folder):
    root, _ = png_folder
    convert_dataset(root, tmp_path / "s.zip", progress=False)
    convert_dataset(root, tmp_path / "s.lmdb", progress=False)
    (tmp_path / "s.lmdb").rename(tmp_path / "plain_dir_lmdb")
    assert isinstance(open_source(root), FolderSource)
    assert isinstance(open_source(str(tmp_path / "s.zip")), ZipSource)
    assert isinstance(open_source(tmp_path / "plain_dir_lmdb"), LmdbSource)  # found by its data.mdb
    assert len(open_source(tmp_path / "plain_dir_lmdb" / "data.mdb")) == 4
    built = open_source("builtin:textures?count=200&seed=3", resolution=32)
    assert isinstance(built, BuiltinSource) and len(built) == 200 and built.seed == 3
    assert built.read(0).shape == (32, 32, 3)
    assert open_source("builtin:photos?resolution=48x16").read(0).shape == (16, 48, 3)
    assert len(open_source("builtin:digits")) == 1797

    labelled = open_source(root, folder_labels=True)
    assert [labelled.label_of(i) for i in range(4)] == [None, 0, 0, 1]

    for bad in ["builtin:clouds", "builtin:textures?size=3", "builtin:textures?count=x", str(tmp_path / "nope.zip"),
                str(tmp_path / "missing")]:
        with pytest.raises(DataError) as caught:
            open_source(bad)
        assert bad.split("?")[0].split(":")[-1] in str(caught.value)
    (tmp_path / "file.txt").write_text("hi")
    with pytest.raises(DataError, match="folder"):
        open_source(tmp_path / "file.txt")


def test_folder_source_ignores_hidden_and_non_image_files(tmp_path):
    _save_png(tmp_path / "a.PNG", np.zeros((4, 4, 3), np.uint8))
    _save_png(tmp_path / ".hidden.png", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "notes.txt").write_text("x")
    _save_png(tmp_path / "sub" / "c.png", np.zeros((4, 4, 3), np.uint8))
    assert [FolderSource(tmp_path).name_of(i) for i in range(2)] == ["a.PNG", "sub/c.png"]
    assert len(FolderSource(tmp_path, recursive=False)) == 1


# ---------------------------------------------------------------------------------------------
# Transforms


def test_to_rgb_uint8_handles_modes_and_arrays():
    assert to_rgb_uint8(np.array([[0, 65535, 257 * 9]], dtype=np.uint16)).tolist() == [[[0] * 3, [255] * 3, [9] * 3]]
    assert to_rgb_uint8(np.array([[0.0, 0.5, 1.0]])).tolist() == [[[0] * 3, [128] * 3, [255] * 3]]
    palette = Image.new("P", (2, 2))
    palette.putpalette([10, 20, 30] * 256)
    assert to_rgb_uint8(palette).tolist()[0][0] == [10, 20, 30]
    cmyk = Image.new("CMYK", (2, 2), (0, 0, 0, 0))
    assert to_rgb_uint8(cmyk).tolist()[0][0] == [255, 255, 255]
    gray_alpha = np.zeros((1, 2, 2), np.uint8)
    gray_alpha[0, 0] = [50, 255]
    assert to_rgb_uint8(gray_alpha).tolist() == [[[50] * 3, [255] * 3]]
    assert to_rgb_uint8(Image.fromarray(np.array([[0, 65535]], dtype=np.int32))).tolist() == [[[0] * 3, [255] * 3]]
    with pytest.raises(DataError):
        to_rgb_uint8(np.zeros((3, 4, 5, 6)))


def test_center_crop_and_resize_shapes():
    image = np.zeros((40, 100, 3), np.uint8)
    image[:, 30:70] = 255  # the centred square is white, the sides black
    cropped = center_crop_resize(image, 20, 20)
    assert cropped.shape == (20, 20, 3) and cropped.min() > 200
    stretched = resize(image, 30, 10)
    assert stretched.shape == (10, 30, 3) and stretched[:, 0].max() < 50
    assert center_crop_resize(image, 100, 40) is image
    assert width_height("64x32") == (64, 32) and width_height(16) == (16, 16)
    with pytest.raises(DataError):
        width_height("big")


# ---------------------------------------------------------------------------------------------
# Torch dataset


def test_image_dataset_values_shape_labels_and_non_square(tmp_path, png_folder):
    dataset = ImageDataset(BuiltinSource("digits", resolution=32, count=20), resolution=(24, 12), use_labels=True)
    image, label = dataset[3]
    assert image.shape == (3, 12, 24) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1 and image.min() < -0.9 and image.max() > 0.5
    assert 0 <= label <= 9 and dataset.num_classes == 10

    root, images = png_folder
    exact = ImageDataset(FolderSource(root), resolution=(20, 12))
    image, label = exact[0]  # a.png is stored at 20x12: no resampling, exact values
    assert label == -1
    expected = torch.from_numpy(images["a.png"]).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(image, expected)
    with pytest.raises(DataError):
        ImageDataset(FolderSource(root), resolution=8, use_labels=True)

    loader = torch.utils.data.DataLoader(exact, batch_size=2, num_workers=0)
    batch, labels = next(iter(loader))
    assert batch.shape == (2, 3, 12, 20) and labels.tolist() == [-1, -1]


def test_hflip_flips_only_masked_images():
    batch = torch.arange(2 * 1 * 1 * 3, dtype=torch.float32).view(2, 1, 1, 3)
    flipped = hflip(batch, torch.tensor([True, False]))
    assert flipped[0, 0, 0].tolist() == [2, 1, 0] and flipped[1, 0, 0].tolist() == [3, 4, 5]


# ---------------------------------------------------------------------------------------------
# Training straight from files: bad images skipped, counted and named (open_training_set)


def _messy_images(rng: np.random.Generator, good: int = 26) -> dict[str, bytes]:
    """`good` usable 16x16 PNGs and four that training must leave out, as encoded bytes by name."""
    def png(pixels: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return buffer.getvalue()

    files = {f"img{i:02d}.png": png(_random_rgb(rng, 16, 16)) for i in range(good)}
    whole = png(_random_rgb(rng, 24, 24))
    files["bad_empty.png"] = b""
    files["cut.png"] = whole[: len(whole) // 2]  # passes a header check, fails a full decode
    files["dot.png"] = png(_random_rgb(rng, 1, 1))
    files["small.png"] = png(_random_rgb(rng, 8, 12))  # would have to be enlarged to 16x16
    return files


def _write_messy_source(kind: str, root: Path, files: dict[str, bytes]) -> Path:
    if kind == "folder":
        root.mkdir()
        for name, data in files.items():
            (root / name).write_bytes(data)
        return root
    if kind == "zip":
        path = root.with_suffix(".zip")
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in files.items():
                archive.writestr(name, data)
        return path
    import lmdb

    path = root.with_suffix(".lmdb")
    environment = lmdb.open(str(path), map_size=1 << 24)
    names = sorted(files)
    with environment.begin(write=True) as transaction:
        for index, name in enumerate(names):
            transaction.put(f"{index:07d}".encode(), files[name])
        transaction.put(b"length", str(len(names)).encode())
        transaction.put(b"names", json.dumps(names).encode())
    environment.close()
    return path


@pytest.mark.parametrize("kind", ["folder", "zip", "lmdb"])
def test_training_set_skips_unreadable_and_too_small_images(tmp_path, kind):
    from patchdiffusion.data import open_training_set

    files = _messy_images(np.random.default_rng(5))
    spec = _write_messy_source(kind, tmp_path / "messy", files)
    run = tmp_path / "run"
    dataset, report = open_training_set(spec, (16, 16), run_dir=run)

    good = sorted(name for name in files if name.startswith("img"))
    assert len(dataset) == report.used == 26 and report.images_in_source == 30
    skipped = dict(report.skipped)
    assert sorted(skipped) == ["bad_empty.png", "cut.png", "dot.png", "small.png"]
    assert "truncated" in skipped["cut.png"] and "too small" in skipped["dot.png"]
    assert "too small" in skipped["small.png"] and "enlarged" in skipped["small.png"]
    # Index i is the i-th usable image in source order, pixel for pixel.
    for i in (0, 7, 25):
        expected = np.asarray(Image.open(io.BytesIO(files[good[i]])).convert("RGB"))
        assert dataset.source.name_of(i) == good[i]
        image, label = dataset[i]
        assert label == -1
        assert torch.equal(image, torch.from_numpy(expected.transpose(2, 0, 1).copy()).float() / 127.5 - 1)
    line = report.summary()
    assert "\n" not in line and "26 of 30 images usable" in line and "skipped 4" in line
    assert "bad_empty.png" in line and "and 1 more" in line and str(run / "skipped_images.txt") in line
    listed = (run / "skipped_images.txt").read_text().splitlines()
    assert listed[0].startswith("# ") and sorted(row.split("\t")[0] for row in listed[2:]) == sorted(skipped)


def test_training_set_resume_keeps_the_recorded_mapping(tmp_path):
    """A resumed run uses the images the run started with, even after a bad file was fixed."""
    from patchdiffusion.data import open_training_set

    rng = np.random.default_rng(6)
    spec = _write_messy_source("folder", tmp_path / "messy", _messy_images(rng))
    run = tmp_path / "run"
    first, _ = open_training_set(spec, 16, run_dir=run)
    _save_png(spec / "bad_empty.png", _random_rgb(rng, 16, 16))  # fixed in the meantime
    resumed, report = open_training_set(spec, 16, run_dir=run, resume=True)
    assert report.from_index and "as when the run started" in report.summary()
    assert len(resumed) == len(first) == 26
    assert all(torch.equal(resumed[i][0], first[i][0]) for i in range(26))
    fresh, _ = open_training_set(spec, 16, run_dir=tmp_path / "new-run")
    assert len(fresh) == 27  # a new run scans again and takes the fixed file

    _save_png(spec / "zz_new.png", _random_rgb(rng, 16, 16))
    with pytest.raises(DataError, match="holds 31 images, but 30 when this run started"):
        open_training_set(spec, 16, run_dir=run, resume=True)


def test_training_set_scan_does_not_depend_on_threads(tmp_path):
    from patchdiffusion.data import open_training_set

    spec = _write_messy_source("zip", tmp_path / "messy", _messy_images(np.random.default_rng(7), good=40))
    _, serial = open_training_set(spec, 16, workers=1)
    _, threaded = open_training_set(spec, 16, workers=3)
    assert serial.skipped == threaded.skipped and serial.used == threaded.used == 40


def test_training_set_builtin_is_as_before_and_writes_nothing(tmp_path):
    from patchdiffusion.data import open_training_set

    dataset, report = open_training_set("builtin:textures?count=8", (16, 16), run_dir=tmp_path / "run")
    before = ImageDataset(open_source("builtin:textures?count=8", resolution=16), resolution=16)
    assert len(dataset) == 8 and all(torch.equal(dataset[i][0], before[i][0]) for i in range(8))
    assert report.summary() == "training set builtin:textures?count=8: 8 images (built-in, generated)"
    assert not (tmp_path / "run").exists()


def test_training_set_with_no_usable_image_is_one_error(tmp_path):
    from patchdiffusion.data import open_training_set

    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    _save_png(folder / "b.png", _random_rgb(np.random.default_rng(8), 4, 4))
    with pytest.raises(DataError, match="no usable image .* all 2 skipped \\(a.png: .*b.png: too small"):
        open_training_set(folder, 16)
