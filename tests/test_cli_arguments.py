"""The `sparsity-ext` argument checks: every bad input exits with 2 and a message before any
work starts, and parsing needs no torch."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import pytest

import sparsity_ext_cli
from sparsity_ext.app import benchmark, data, loop, models
from sparsity_ext_cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def started(monkeypatch):
    """The configs that `train` and the benchmark were started with; neither does any work."""
    calls = []
    monkeypatch.setattr(loop, "train", lambda config: calls.append(("train", config)))
    monkeypatch.setattr(benchmark, "main", lambda **kwargs: calls.append(("bench", kwargs)))
    return calls


def exit_status(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_info:
        return exit_info.code


def bad_train_arguments(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    return [
        (["--lr", "inf"], "argument --lr: must be a finite number > 0.0, got inf"),
        (["--lr", "nan"], "argument --lr: must be a finite number > 0.0, got nan"),
        (["--lr", "0"], "argument --lr: must be > 0.0, got 0"),
        (["--lr", "abc"], "argument --lr: expected a number > 0.0, got 'abc'"),
        (["--penalty", "inf"], "argument --penalty: must be a finite number >= 0.0, got inf"),
        (["--penalty", "-0.5"], "argument --penalty: must be >= 0.0, got -0.5"),
        (["--seed", "-5"], "argument --seed: must be >= 0 and <= 4294967295, got -5"),
        (["--seed", str(2**32)], "argument --seed: must be >= 0 and <= 4294967295"),
        (["--seed", "1.5"], "argument --seed: expected a number"),
        (["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
        (["--batch-size", "-3"], "argument --batch-size: must be >= 1, got -3"),
        (["--device", "meta"], "argument --device: 'meta' is not a compute device"),
        (["--device", "tpu-ish"], "argument --device: 'tpu-ish' is not a compute device"),
        (["--dataset", "mnist"], "argument --dataset: invalid choice: 'mnist'"),
        (["--out", str(tmp_path / "a_file")],
         f"argument --out: {tmp_path / 'a_file'} is a file, not a folder"),
        (["--out", str(tmp_path / "a_file" / "sub")],
         f"argument --out: cannot create {tmp_path}/a_file/sub: {tmp_path}/a_file is a file"),
        (["--epcohs", "3"], "unrecognized arguments: --epcohs 3"),
        (["--out", str(tmp_path / "run"), "extra"], "unrecognized arguments: extra"),
    ]  # fmt: skip


def test_every_bad_train_argument_exits_2_with_the_train_usage(tmp_path, started, capsys):
    out = tmp_path / "run"
    for args, message in bad_train_arguments(tmp_path):
        assert exit_status(["train", "--out", str(out), *args] if "--out" not in args
                           else ["train", *args]) == 2, args  # fmt: skip
        err = capsys.readouterr().err
        assert err.startswith("usage: sparsity-ext train "), (args, err)
        assert f"sparsity-ext train: error: {message}" in err, (args, err)
    assert started == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # --out was not created


def test_an_unwritable_out_folder_is_refused(tmp_path, started, capsys, monkeypatch):
    # As root every folder is writable, so the refusal of the probe file stands in for it.
    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", dir)

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    assert exit_status(["train", "--out", str(tmp_path / "new" / "run")]) == 2
    assert f"argument --out: cannot write in {tmp_path} (Permission denied)" in (
        capsys.readouterr().err
    )
    assert exit_status(["bench", "--out", str(tmp_path / "table.md")]) == 2
    assert f"argument --out: cannot write in {tmp_path}" in capsys.readouterr().err
    assert started == [] and list(tmp_path.iterdir()) == []


def test_every_bad_bench_argument_exits_2_with_the_bench_usage(tmp_path, started, capsys):
    (tmp_path / "a_file").write_text("")
    for args, message in [
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
        (["--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
        (["--processes", "0"], "argument --processes: must be >= 1, got 0"),
        (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
        (["--out", str(tmp_path)], f"argument --out: {tmp_path} is a folder, not a file"),
        (["--out", str(tmp_path / "a_file" / "t.md")],
         f"argument --out: {tmp_path / 'a_file'} is a file"),
        (["--repaets", "3"], "unrecognized arguments: --repaets 3"),
    ]:
        assert exit_status(["bench", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("usage: sparsity-ext bench "), (args, err)
        assert f"sparsity-ext bench: error: {message}" in err, (args, err)
    assert started == []


def test_bench_on_a_missing_gpu_exits_2_before_timing(started, capsys, monkeypatch):
    monkeypatch.setattr(loop.torch.cuda, "is_available", lambda: False)
    assert exit_status(["bench", "--device", "cuda"]) == 2
    assert "sparsity-ext bench: error: --device cuda: CUDA is not available" in (
        capsys.readouterr().err
    )
    assert started == []


def test_library_callers_get_the_device_check_too():
    for name, message in [("meta", "--device meta: not a compute device"),
                          ("tpu-ish", "--device 'tpu-ish' is not a device name")]:  # fmt: skip
        with pytest.raises(loop.ConfigError, match=message):
            loop.resolve_device(name)
    assert loop.resolve_device("cpu") == loop.torch.device("cpu")


def test_train_gets_every_flag_as_its_config(tmp_path, started, monkeypatch):
    out = str(tmp_path / "new" / "run")
    argv = ["train", "--out", out, "--dataset", "cifar10", "--data-dir", "somewhere",
            "--model", "resnet", "--epochs", "3", "--batch-size", "5", "--lr", "0.25",
            "--penalty", "0.5", "--seed", "4294967295", "--device", "cpu", "--train-size", "7",
            "--test-size", "9", "--optimizer", "adam", "--label-noise", "0.1",
            "--penalty-normalize", "l1", "--early-stop-on-sparsity", "sparsity_l1"]  # fmt: skip
    assert main(argv) == 0
    assert [asdict(config) for _, config in started] == [{
        "out": out, "dataset": "cifar10", "data_dir": "somewhere", "model": "resnet",
        "epochs": 3, "batch_size": 5, "lr": 0.25, "penalty": 0.5, "seed": 2**32 - 1,
        "device": "cpu", "train_size": 7, "test_size": 9, "progress": False,
        "optimizer": "adam", "label_noise": 0.1, "penalty_normalize": "l1",
        "early_stop_on_sparsity": "sparsity_l1",
    }]  # fmt: skip
    assert not (tmp_path / "new").exists()  # checked, not created: train creates it


def test_progress_bars_only_on_a_terminal(tmp_path, started, monkeypatch):
    """A piped log gets no progress bars; a terminal gets them unless --no-progress."""
    out = ["--out", str(tmp_path)]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    main(["train", *out])
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    main(["train", *out])
    main(["train", *out, "--no-progress"])
    assert [config.progress for _, config in started] == [False, True, False]


def test_the_parser_mirrors_the_application(started):
    """Choices and defaults are written in the torch-free parser and in the application."""
    assert sparsity_ext_cli.DATASETS == tuple(data.DATASETS)
    assert sparsity_ext_cli.MODELS == tuple(models.MODELS)
    defaults = asdict(loop.TrainConfig())
    mirrored = sparsity_ext_cli.TRAIN_DEFAULTS
    assert mirrored == {name: defaults[name] for name in mirrored}
    main(["train"])  # every default through the parser gives TrainConfig's defaults
    assert asdict(started[0][1]) == {**defaults, "progress": False}


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip


@pytest.mark.parametrize(
    "argv, status, output",
    [
        (["--help"], 0, "redraw the PNG plots"),
        (["train", "--help"], 0, "usage: sparsity-ext train"),
        (["train", "--lr", "inf"], 2, "must be a finite number"),
        (["train", "--epcohs", "3"], 2, "unrecognized arguments: --epcohs"),
        (["plot"], 2, "the following arguments are required: RUN_DIR"),
    ],
)
def test_help_and_argument_errors_import_no_torch(argv, status, output):
    """The console script's module answers these with only the standard library loaded."""
    code = (
        "import json, sys, sparsity_ext_cli\ncode = None\n"
        "try:\n"
        f"    sparsity_ext_cli.main({argv!r})\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('torch', 'numpy', 'sparsity_ext'))\n"
        "print(json.dumps({'code': code, 'heavy': heavy}))\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"code": status, "heavy": []}
    assert output in result.stdout + result.stderr


def test_the_console_script_is_the_torch_free_module():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["sparsity-ext"] == "sparsity_ext_cli:main"
    assert "sparsity_ext_cli" in project["tool"]["setuptools"]["py-modules"]


def test_the_module_entry_point_reports_errors_without_a_traceback(tmp_path):
    args = ["train", "--out", str(tmp_path), "--dataset", "cifar10", "--data-dir", str(tmp_path)]
    result = subprocess.run([sys.executable, "-m", "sparsity_ext", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"sparsity-ext train: error: CIFAR-10 not found in {tmp_path}")
    assert "Traceback" not in result.stderr
