"""Checkpoints that verify themselves: manifest, fsync order, damaged ones skipped, full disk, pruning."""

import errno
import json
import os

import pytest
import torch

from patchdiffusion import run as runs
from patchdiffusion.run import RunError


def state(value: float, step: int):
    net = {"w": torch.full((4096,), value), "b": torch.full((3,), value)}
    ema = {"w": torch.full((4096,), value + 0.5), "b": torch.full((3,), value + 0.5)}
    return net, ema, {"step": step, "t": torch.arange(3) * value}


def save(run_dir, step, keep=0):
    net, ema, train_state = state(float(step), step)
    return runs.save_checkpoint(run_dir, step, net, ema, train_state, keep=keep)


def flip_bytes(path, start=100, count=4096):
    data = bytearray(path.read_bytes())
    end = min(len(data), start + count)
    data[start:end] = bytes(b ^ 0xFF for b in data[start:end])
    path.write_bytes(bytes(data))


def truncate(path, keep_fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


def collect():
    lines = []
    return lines, lines.append


# ------------------------------------------------------------------------------------------------
# 1. manifest


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    path = save(tmp_path, 1)
    manifest = json.loads((path / runs.MANIFEST_NAME).read_text())
    assert manifest["step"] == 1
    assert sorted(manifest["files"]) == sorted(runs.CHECKPOINT_FILES)
    for name, entry in manifest["files"].items():
        assert entry["size"] == (path / name).stat().st_size
        assert entry["sha256"] == runs.file_sha256(path / name)
    assert runs.verify_checkpoint(runs.Checkpoint(path, 1)) is True


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names open files through /proc (Linux)")
def test_files_and_folder_are_fsynced_before_the_rename_and_the_parent_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else str(fd)
        events.append(("fsync", os.path.basename(target)))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.path.basename(str(dst))))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save(tmp_path, 7)
    rename = events.index(("rename", "step-00000007"))
    before = [name for kind, name in events[:rename] if kind == "fsync"]
    for name in (*runs.CHECKPOINT_FILES, runs.MANIFEST_NAME):
        assert name in before, events
    assert before.index(runs.MANIFEST_NAME) > max(before.index(n) for n in runs.CHECKPOINT_FILES)  # written last
    assert before[-1].startswith(".tmp-step-00000007")  # then the folder itself
    assert ("fsync", "checkpoints") in events[rename + 1:]  # and the parent after the rename


@pytest.mark.parametrize(
    "damage, file, problem",
    [
        (flip_bytes, "net.safetensors", "net.safetensors: sha256 mismatch"),
        (truncate, "ema.safetensors", "ema.safetensors: "),
        (truncate, "state.pt", "state.pt: "),
        (lambda p: p.unlink(), "state.pt", "state.pt: missing"),
        (lambda p: p.write_text("{not json"), runs.MANIFEST_NAME, "manifest.json: unreadable"),
    ],
)
def test_damaged_newest_checkpoint_is_skipped_with_one_line(tmp_path, damage, file, problem):
    save(tmp_path, 200)
    newest = save(tmp_path, 400)
    damage(newest / file)
    lines, log = collect()
    chosen = runs.newest_verified_checkpoint(tmp_path, log)
    assert chosen.step == 200
    assert len(lines) == 1
    assert lines[0].startswith(f"checkpoint step-00000400 is damaged ({problem}")
    assert lines[0].endswith("; using step-00000200")


def test_latest_checkpoint_falls_back_and_says_so_on_stderr(tmp_path, capsys):
    save(tmp_path, 1)
    flip_bytes(save(tmp_path, 2) / "ema.safetensors")
    assert runs.latest_checkpoint(tmp_path).step == 1
    err = capsys.readouterr().err
    assert "checkpoint step-00000002 is damaged (ema.safetensors: sha256 mismatch); using step-00000001" in err


def test_every_checkpoint_damaged_is_one_error(tmp_path):
    flip_bytes(save(tmp_path, 1) / "net.safetensors")
    truncate(save(tmp_path, 2) / "state.pt")
    with pytest.raises(RunError, match="no usable checkpoint.*step-00000002 \\(state.pt.*step-00000001 \\(net"):
        runs.newest_verified_checkpoint(tmp_path, log=None)


@pytest.mark.parametrize("which", ["net", "ema"])
def test_loading_a_truncated_weights_file_is_one_line_naming_it(tmp_path, which):
    path = save(tmp_path, 1)
    truncate(path / f"{which}.safetensors")
    with pytest.raises(RunError) as caught:
        runs.load_weights(runs.Checkpoint(path, 1), which)
    message = str(caught.value)
    assert "\n" not in message and f"{which}.safetensors" in message and "truncated or corrupt" in message
    assert "SafetensorError" not in message


def test_loading_a_truncated_state_file_is_one_line_naming_it(tmp_path):
    path = save(tmp_path, 1)
    truncate(path / "state.pt")
    with pytest.raises(RunError) as caught:
        runs.load_train_state(runs.Checkpoint(path, 1))
    message = str(caught.value)
    assert "\n" not in message and "state.pt" in message and "PytorchStreamReader" not in message


def test_checkpoint_without_manifest_loads_unverified_with_a_note(tmp_path):
    save(tmp_path, 1)
    legacy = save(tmp_path, 2)
    (legacy / runs.MANIFEST_NAME).unlink()  # as written before manifests existed
    lines, log = collect()
    chosen = runs.newest_verified_checkpoint(tmp_path, log)
    assert chosen.step == 2 and len(lines) == 1
    assert "step-00000002 has no manifest.json" in lines[0] and "unverified" in lines[0]
    assert torch.equal(runs.load_weights(chosen, "net")["b"], torch.full((3,), 2.0))
    # Truncation is still caught without a manifest: the structural check falls back to step 1.
    truncate(legacy / "net.safetensors", 0.9)
    lines.clear()
    assert runs.newest_verified_checkpoint(tmp_path, log).step == 1
    assert lines[0].startswith("checkpoint step-00000002 is damaged (net.safetensors: truncated")


def test_stale_temp_folders_are_removed_at_the_next_save(tmp_path):
    save(tmp_path, 1)
    stale = runs.checkpoint_dir(tmp_path) / ".tmp-step-00000002-99999"
    stale.mkdir()
    (stale / "net.safetensors").write_bytes(b"half")
    save(tmp_path, 2)
    assert not stale.exists()
    assert [p.name for p in runs.checkpoint_dir(tmp_path).iterdir() if p.name.startswith(".")] == []


def test_writing_a_step_again_replaces_the_damaged_one(tmp_path):
    save(tmp_path, 1)
    flip_bytes(save(tmp_path, 2) / "net.safetensors")
    save(tmp_path, 2)
    assert runs.newest_verified_checkpoint(tmp_path, log=None).step == 2


# ------------------------------------------------------------------------------------------------
# pruning


def test_damaged_checkpoints_do_not_count_towards_keep(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step)
    flip_bytes(runs.checkpoint_dir(tmp_path) / "step-00000003" / "net.safetensors")
    save(tmp_path, 4, keep=2)
    # 4 and 2 are the two usable ones; damaged 3 sits between them and is kept, 1 goes.
    assert [c.step for c in runs.list_checkpoints(tmp_path)] == [2, 3, 4]


def test_a_resume_from_an_older_checkpoint_never_prunes_it(tmp_path):
    """The issue's case: a damaged newest checkpoint must not make the run delete the good older one."""
    save(tmp_path, 200)
    flip_bytes(save(tmp_path, 400) / "net.safetensors")
    assert runs.newest_verified_checkpoint(tmp_path, log=None).step == 200  # what --resume picks
    save(tmp_path, 300, keep=1)  # the resumed run's next checkpoint
    steps = [c.step for c in runs.list_checkpoints(tmp_path)]
    assert 300 in steps and runs.newest_verified_checkpoint(tmp_path, log=None).step == 300
    save(tmp_path, 400, keep=1)  # reaching the damaged step replaces it
    assert runs.newest_verified_checkpoint(tmp_path, log=None).step == 400
    assert [c.step for c in runs.list_checkpoints(tmp_path)] == [400]


def test_a_new_checkpoint_that_does_not_verify_prunes_nothing(tmp_path, monkeypatch):
    save(tmp_path, 1)
    save(tmp_path, 2)
    real_close = runs._HashingFile.close

    def close_with_wrong_hash(self):
        record = real_close(self)
        if self.path.name == "ema.safetensors":
            return runs.FileRecord(record.size, "0" * 64)  # as if the bytes on disk differ from those produced
        return record

    monkeypatch.setattr(runs._HashingFile, "close", close_with_wrong_hash)
    with pytest.raises(RunError, match="step-00000003 is damaged \\(ema.safetensors: sha256 mismatch\\) right after"):
        save(tmp_path, 3, keep=1)
    monkeypatch.undo()
    assert [c.step for c in runs.list_checkpoints(tmp_path)] == [1, 2, 3]
    assert runs.newest_verified_checkpoint(tmp_path, log=None).step == 2


# ------------------------------------------------------------------------------------------------
# 2. disk full


def fill_disk_while_writing(monkeypatch, file_name):
    """Make the checkpoint writer hit ENOSPC half-way through `file_name`."""
    real_write = runs._HashingFile.write

    def write(self, data):
        if self.path.name == file_name:
            real_write(self, bytes(data)[: max(1, len(data) // 2)])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(runs._HashingFile, "write", write)


@pytest.mark.parametrize("file_name", ["net.safetensors", "ema.safetensors", "state.pt", "manifest.json"])
def test_disk_full_is_one_line_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch, file_name):
    save(tmp_path, 1)
    fill_disk_while_writing(monkeypatch, file_name)
    with pytest.raises(RunError) as caught:
        save(tmp_path, 2, keep=1)
    monkeypatch.undo()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"disk full while writing checkpoint step-00000002 ({file_name}); "
                              "the previous checkpoint step-00000001 is intact")
    assert [p.name for p in runs.checkpoint_dir(tmp_path).iterdir()] == ["step-00000001"]  # temp folder gone
    assert runs.newest_verified_checkpoint(tmp_path, log=None).step == 1


def test_disk_full_during_training_then_resume(tmp_path, monkeypatch, capsys):
    from patchdiffusion.cli import main

    tiny = ["--data", "builtin:textures?count=16", "--resolution", "16", "--batch", "4", "--device", "cpu",
            "--no-progress", "model.net.model_channels=8", "model.net.channel_mult=[1,2]",
            "model.net.num_res_blocks=1", "model.net.attention_resolutions=[8]", "model.net.head_channels=8",
            "train.sample_images=0", "train.checkpoint_every=2"]
    run = tmp_path / "run"
    real_save = runs.save_checkpoint

    def save_with_full_disk_at_step_4(run_dir, step, *args, **kwargs):
        if step == 4:
            fill_disk_while_writing(monkeypatch, "state.pt")
        return real_save(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(runs, "save_checkpoint", save_with_full_disk_at_step_4)
    assert main(["train", "--run", str(run), "--steps", "4", *tiny]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "disk full while writing checkpoint step-00000004 (state.pt)" in err[0]
    assert "the previous checkpoint step-00000002 is intact" in err[0]
    monkeypatch.undo()
    assert main(["train", "--run", str(run), "--resume", "--no-progress"]) == 0
    assert "at step 2" in capsys.readouterr().out
    assert runs.newest_verified_checkpoint(run, log=None).step == 4


# ------------------------------------------------------------------------------------------------
# sample uses the fallback too


def test_sample_uses_the_newest_checkpoint_that_verifies(tmp_path, capsys):
    from patchdiffusion.cli import main
    from patchdiffusion.sample import load_run

    tiny = ["--data", "builtin:textures?count=16", "--resolution", "16", "--batch", "4", "--device", "cpu",
            "--no-progress", "model.net.model_channels=8", "model.net.channel_mult=[1,2]",
            "model.net.num_res_blocks=1", "model.net.attention_resolutions=[8]", "model.net.head_channels=8",
            "train.sample_images=0", "train.checkpoint_every=1", "train.keep_checkpoints=3"]
    run = tmp_path / "run"
    assert main(["train", "--run", str(run), "--steps", "2", *tiny]) == 0
    capsys.readouterr()
    flip_bytes(runs.checkpoint_dir(run) / "step-00000002" / "ema.safetensors")
    loaded = load_run(run)
    assert loaded.checkpoint.step == 1
    assert "step-00000002 is damaged (ema.safetensors: sha256 mismatch); using step-00000001" in capsys.readouterr().err
