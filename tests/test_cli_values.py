"""Every numeric option of train, sample, eval, data convert and demo refuses 0 / negative / nan /
absurd values where they make no sense, with one line and exit code 2 — never a traceback."""

import dataclasses

import pytest

from patchdiffusion.cli import build_parser, main
from patchdiffusion.config import DataConfig, RunConfig, SampleConfig, TrainConfig

MISSING = "/nonexistent/patchdiff-test"
# Each command with arguments that make it stop at once with a one-line error once its options are
# accepted (a data set or run that does not exist), so no accepted value starts real work.
COMMANDS = {
    ("train",): ["--data", MISSING, "--no-progress"],
    ("sample",): ["--run", MISSING, "--no-progress"],
    ("eval",): ["--images", MISSING, "--ref", MISSING, "--no-progress"],
    ("eval", "ref"): ["--data", MISSING, "--dest", MISSING + ".npz", "--no-progress"],
    ("data", "convert"): ["--source", MISSING, "--dest", MISSING + "-out"],
    ("demo",): ["--data", MISSING, "--no-progress"],
    ("compare",): ["--methods", "full", "--data", MISSING, "--out", "compare-out", "--no-progress"],
}
BAD = ["-1", "nan", "inf", "-inf", "1e30", "abc", ""]


def subparser(path: tuple[str, ...]):
    parser = build_parser()
    for word in path:
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = sub.choices[word]
    return parser


def value_options(path):
    """(flag, argparse action) of every option of the command that takes a value."""
    given = set(COMMANDS[path][::2])
    for action in subparser(path)._actions:
        if action.option_strings and action.nargs != 0 and not action.choices and action.dest != "help":
            flag = max(action.option_strings, key=len)
            if not given & set(action.option_strings):
                yield flag, action


def run(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    return code, lines


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_every_option_refuses_meaningless_values_in_one_line(path, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a command might write stays here
    options = list(value_options(path))
    assert options, f"{' '.join(path)} has no value options?"
    for flag, action in options:
        numeric = getattr(action.type, "numeric", False)
        values = BAD + (["0", "2.5"] if numeric else ["0", "0x0", "-8"])
        for value in values:
            argv = [*path, *COMMANDS[path], f"{flag}={value}"]
            code, lines = run(capsys, argv)
            assert code == 2 and len(lines) == 1 and "Traceback" not in lines[0], (argv, lines)
            if numeric and value in ("-1", "nan", "inf", "-inf", "1e30", "abc", ""):
                assert flag in lines[0], (argv, lines)  # refused as that option's value, not later


def test_zero_is_refused_where_it_makes_no_sense(capsys):
    for argv in (["train", "--steps", "0"], ["train", "--batch", "0"], ["train", "--steps", "-1"],
                 ["sample", "--run", MISSING, "--num", "0"], ["demo", "--minutes", "0"],
                 ["eval", "--images", MISSING, "--batch", "0"]):
        code, lines = run(capsys, argv)
        assert code == 2 and len(lines) == 1 and argv[-2] in lines[0], (argv, lines)


def numeric_fields(cls, prefix):
    for f in dataclasses.fields(cls):
        if f.type in ("int", "float", int, float):
            yield f"{prefix}.{f.name}"


@pytest.mark.parametrize("key", [
    *numeric_fields(TrainConfig, "train"), *numeric_fields(SampleConfig, "sample"),
    *numeric_fields(DataConfig, "data"), "model.net.model_channels", "model.sigma_data", "model.label_dropout",
])
def test_config_values_refuse_nan_negative_and_absurd(key, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for value in ("nan", "-inf", "-1", "1e30"):
        if key == "sample.S_max" and value == "1e30":
            continue  # S_max is "churn up to this sigma": any bound, infinity included, makes sense
        code, lines = run(capsys, ["train", "--data", MISSING, "--no-progress", f"{key}={value}"])
        assert code == 2 and len(lines) == 1 and key in lines[0], (key, value, lines)


def test_resume_with_the_same_data_is_accepted_and_other_data_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    common = ["--resolution", "16", "--batch", "2", "--device", "cpu", "--no-progress", "train.sample_images=0",
              "model.net.model_channels=8", "model.net.channel_mult=[1,2]", "model.net.num_res_blocks=1",
              "model.net.attention_resolutions=[]"]
    data = "builtin:textures?count=4"
    assert main(["train", "--data", data, "--run", str(run_dir), "--steps", "1", *common]) == 0
    assert main(["train", "--data", data, "--run", str(run_dir), "--resume", "--steps", "2", "--resolution", "16",
                 "--no-progress"]) == 0
    capsys.readouterr()
    code, lines = run(capsys, ["train", "--data", "builtin:photos", "--run", str(run_dir), "--resume",
                               "--steps", "3", "--no-progress"])
    assert code == 2 and "cannot change 'data.source'" in lines[0]
