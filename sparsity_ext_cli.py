"""The ``sparsity-ext`` command line: its arguments, parsed before anything imports torch.

``import sparsity_ext`` loads torch (the ops must exist after it), which takes seconds. This
module imports only the standard library, so ``--help`` and every argument error answer at
once, with the usage of the subcommand that was mistyped. Whatever can be checked without
torch is checked here, before any work starts: numbers are finite and in range, ``--device``
names a compute device, ``--out`` is a folder (or file) that can be written. Only a command
line that parsed imports :mod:`sparsity_ext.app.cli`, which runs the command.

One function per subcommand adds its parser; ``main`` is the ``sparsity-ext`` console script
and ``python -m sparsity_ext``.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
from pathlib import Path

__all__ = ["build_parser", "main"]

# Mirrors of the application's choices and TrainConfig's defaults, which live where torch is
# imported; tests/test_cli_arguments.py checks that they agree.
DATASETS = ("digits", "cifar10")
MODELS = ("vgg", "resnet")
TRAIN_DEFAULTS = {
    "out": "runs/sparsity", "dataset": "digits", "model": "vgg", "epochs": 60, "batch_size": 32,
    "optimizer": "sgd", "lr": None, "label_noise": 0.3, "penalty": 0.0,
    "penalty_normalize": "softmax", "seed": 0, "device": "auto",
}  # fmt: skip
OPTIMIZERS = ("sgd", "adam")
NORMALIZATIONS = ("softmax", "l1")
SIGNAL_MEASURES = ("sparsity", "sparsity_l1")
BENCH_DTYPES = ("float32", "bfloat16", "float16", "float64")
MAX_SEED = 2**32 - 1  # numpy's and torch's seeds both take this range
COMPUTE_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


# --- argument types: each turns the text into a value or raises with what is wrong ------------


def number(kind: type, minimum: float, *, inclusive: bool = True, maximum: float | None = None):
    """argparse type: a finite ``kind`` number >= (or >) ``minimum`` and <= ``maximum``."""
    bound = f">= {minimum}" if inclusive else f"> {minimum}"
    if maximum is not None:
        bound += f" and <= {maximum}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
        in_range = value >= minimum if inclusive else value > minimum
        if not (in_range and (maximum is None or value <= maximum)):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


def compute_device(text: str) -> str:
    """argparse type: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (not meta, not a typo)."""
    if not COMPUTE_DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a compute device; choose auto, cpu, cuda or cuda:N"
        )
    return text


def _check_writable_folder(path: Path) -> None:
    """Raise ArgumentTypeError unless ``path`` is a writable folder or can be made one: its
    nearest existing ancestor is a folder in which a file can be created and removed (the
    only test that also holds for root and for read-only mounts). Creates nothing."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        if existing == path:
            raise argparse.ArgumentTypeError(f"{path} is a file, not a folder")
        raise argparse.ArgumentTypeError(f"cannot create {path}: {existing} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise argparse.ArgumentTypeError(
            f"cannot write in {existing} ({error.strerror or error})"
        ) from None


def writable_folder(text: str) -> str:
    """argparse type: a folder that is writable, or can be created (see above)."""
    _check_writable_folder(Path(text))
    return text


def writable_file(text: str) -> str:
    """argparse type: a path that is not a folder, in a folder that is writable or can be
    created."""
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    _check_writable_folder(Path(text).parent)
    return text


# --- one function per subcommand --------------------------------------------------------------


def add_build_parser(sub) -> None:
    p = sub.add_parser("build", help="compile the C++ (and CUDA) extension ahead of time")
    p.add_argument("--cuda", action="store_true",
                   help="compile the CUDA kernels too, even without a GPU (sm_80, sm_90 + PTX)")
    p.add_argument("--verbose", action="store_true", help="show the compiler's output")


def add_info_parser(sub) -> None:
    sub.add_parser("info", help="torch/CUDA versions, compiled devices, cache folder")


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="time ours against eager, torch.compile and the copy floor")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   help="default: every available one (cuda is the current GPU)")
    p.add_argument("--dtype", action="append", choices=BENCH_DTYPES,
                   help="repeatable; default float32 and bfloat16")
    p.add_argument("--repeats", type=number(int, 1), default=15,
                   help="timed repetitions per case (median)")
    p.add_argument("--processes", type=number(int, 1), default=1,
                   help="CPU: fresh processes per case and mode, their calls pooled (the "
                        "speed of one process differs from the next by tens of percent)")
    p.add_argument("--out", type=writable_file, metavar="FILE.md",
                   help="also write the table(s) to this markdown file")


def add_setting_arguments(p: argparse.ArgumentParser, sweep: bool) -> None:
    """The options of a training setting, the one home of their types, defaults and help
    for `train` and `study`. With ``sweep`` (study) the swept ones, --label-noise, --penalty
    and --penalty-normalize, take one value or several."""
    d = TRAIN_DEFAULTS

    def swept(name: str) -> dict:
        return {"nargs": "+", "default": [d[name]]} if sweep else {"default": d[name]}

    positive_int = number(int, 1)
    p.add_argument("--dataset", choices=DATASETS, default=d["dataset"],
                   help="digits: scikit-learn's bundled 8x8 digits (offline, the default); "
                        "cifar10: from --data-dir")
    p.add_argument("--data-dir", metavar="DIR",
                   help="folder with the extracted CIFAR-10 python batches")
    p.add_argument("--model", choices=MODELS, default=d["model"],
                   help="VGG-style or ResNet-style CNN (default: %(default)s)")
    p.add_argument("--epochs", type=positive_int, default=d["epochs"],
                   help="(default: %(default)s)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d["optimizer"],
                   help="SGD with momentum 0.9, or Adam (default: %(default)s)")
    p.add_argument("--lr", type=number(float, 0.0, inclusive=False), default=d["lr"],
                   help="learning rate (default: 0.01 for sgd, 0.001 for adam)")
    p.add_argument("--label-noise", type=number(float, 0.0, maximum=0.99), metavar="SHARE",
                   help="share of training labels replaced by a wrong class; the test labels "
                        "stay clean (default: %(default)s)", **swept("label_noise"))
    p.add_argument("--penalty", type=number(float, 0.0), metavar="WEIGHT",
                   help="add WEIGHT x the mean sparsity of the conv layers to the loss "
                        "(default: %(default)s)", **swept("penalty"))
    p.add_argument("--penalty-normalize", choices=NORMALIZATIONS,
                   help="the sparsity the penalty lowers: the paper's softmax one or the "
                        "scale-invariant L1 one (default: %(default)s)",
                   **swept("penalty_normalize"))
    p.add_argument("--device", type=compute_device, default=d["device"],
                   help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--train-size", type=positive_int, metavar="N",
                   help="training images (default: digits 1000, cifar10 5000)")


def add_train_parser(sub) -> None:
    d = TRAIN_DEFAULTS
    p = sub.add_parser(
        "train", help="train a small CNN while monitoring its layer-wise sparsity",
        description="Train a CNN, monitor the perplexity-based sparsity of every conv layer, "
                    "and write history.csv, metrics.csv, summary.json and PNG plots into --out. "
                    "Runs under torchrun too (DistributedDataParallel; rank 0 writes).")
    p.add_argument("--out", type=writable_folder, default=d["out"], metavar="DIR",
                   help="output folder, created if needed (default: %(default)s)")
    add_setting_arguments(p, sweep=False)
    p.add_argument("--batch-size", type=number(int, 1), default=d["batch_size"],
                   help="per process (default: %(default)s)")
    p.add_argument("--early-stop-on-sparsity", nargs="?", const="sparsity", metavar="MEASURE",
                   choices=SIGNAL_MEASURES,
                   help="stop where the online signal of MEASURE (training-split sparsity, no "
                        "validation data; sparsity or sparsity_l1, default sparsity) fires")
    p.add_argument("--seed", type=number(int, 0, maximum=MAX_SEED), default=d["seed"],
                   help="(default: %(default)s)")
    p.add_argument("--test-size", type=number(int, 1), metavar="N",
                   help="test images (default: digits all the rest, cifar10 2000)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (there are none when stderr is not a terminal)")


def add_study_parser(sub) -> None:
    p = sub.add_parser(
        "study", help="run a train setting over seeds, label noise and penalties; tabulate",
        description="Run `train` for every --label-noise x --penalty x --penalty-normalize "
                    "(a zero penalty once) x --seeds, one run after another, and write "
                    "study.csv (per run: test-loss minimum, each measure's onset and signed "
                    "lead, the online signal, test accuracy at each stopping point), "
                    "study_summary.md and study.png into --out. Finished runs are reused.")
    p.add_argument("--out", type=writable_folder, default="runs/study", metavar="DIR",
                   help="(default: %(default)s)")
    p.add_argument("--seeds", type=number(int, 0, maximum=MAX_SEED), nargs="+",
                   default=[0, 1, 2], metavar="SEED", help="(default: 0 1 2)")
    add_setting_arguments(p, sweep=True)


def add_plot_parser(sub) -> None:
    p = sub.add_parser("plot", help="redraw the PNG plots of a `train` run from its files")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a train run")


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each subcommand's parser by name."""
    parser = argparse.ArgumentParser(
        prog="sparsity-ext",
        description="Perplexity-based activation sparsity (Huesmann et al., arXiv:2104.06153).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_build_parser, add_info_parser, add_bench_parser, add_train_parser,
                add_plot_parser, add_study_parser):
        add(sub)
    return parser, sub.choices


def build_parser() -> argparse.ArgumentParser:
    return _parsers()[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; on an error print the failing subcommand's usage and exit with 2."""
    parser, subcommands = _parsers()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # argparse would report these from the top-level parser, whose usage does not show
        # the flags of the subcommand being typed.
        subcommands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sparsity_ext.app.cli import run  # imports torch: only now that the arguments are good

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
