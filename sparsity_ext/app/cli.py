"""The `sparsity-ext` command line (also `python -m sparsity_ext`).

Each subcommand is one small function; the work lives in the modules they call.
"""

from __future__ import annotations

import argparse
import sys


def _cmd_build(args: argparse.Namespace) -> int:
    from .. import _extension

    status = _extension.build(with_cuda=True if args.cuda else None, verbose=args.verbose)
    print(status.describe())
    return 0 if status.loaded or status.built else 1


def _cmd_info(args: argparse.Namespace) -> int:
    from .. import _extension

    print(_extension.info())
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import benchmark
    from .errors import ConfigError
    from .loop import resolve_device

    if args.device is not None:
        try:
            resolve_device(args.device)  # the same availability check as `train --device`
        except ConfigError as error:
            print(f"sparsity-ext bench: error: {error}", file=sys.stderr)
            return 2
    benchmark.main(device=args.device, dtypes=args.dtype, repeats=args.repeats, out=args.out)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .loop import TrainConfig, train

    config = TrainConfig(
        out=args.out, dataset=args.dataset, data_dir=args.data_dir, model=args.model,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, penalty=args.penalty,
        seed=args.seed, device=args.device, train_size=args.train_size, test_size=args.test_size,
        progress=not args.no_progress, optimizer=args.optimizer, label_noise=args.label_noise,
        penalty_normalize=args.penalty_normalize,
        early_stop_on_sparsity=args.early_stop_on_sparsity,
    )
    try:
        train(config)
    except ConfigError as error:
        print(f"sparsity-ext train: error: {error}", file=sys.stderr)
        return 2
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .errors import ConfigError
    from .loop import TrainConfig
    from .study import run_study, study_configs

    base = TrainConfig(
        dataset=args.dataset, data_dir=args.data_dir, model=args.model, epochs=args.epochs,
        optimizer=args.optimizer, lr=args.lr, device=args.device, train_size=args.train_size,
    )  # fmt: skip
    out = Path(args.out)
    configs = study_configs(
        base, out, args.seeds, args.label_noise, args.penalty, args.penalty_normalize
    )
    try:
        run_study(configs, out)
    except ConfigError as error:
        print(f"sparsity-ext study: error: {error}", file=sys.stderr)
        return 2
    return 0


def _add_study_parser(sub) -> None:
    from .data import DATASETS
    from .loop import TrainConfig
    from .models import MODELS

    d = TrainConfig()
    p = sub.add_parser(
        "study", help="run a train setting over seeds, noise levels and penalties; tabulate",
        description="Run `train` for every combination of --label-noise x --penalty x "
                    "--penalty-normalize (a zero penalty once) x --seeds, one after another, "
                    "and write study.csv (per run: test-loss minimum, each measure's onset and "
                    "signed lead, the online signal, test accuracy at each stopping point), "
                    "study_summary.md and study.png into --out. Finished runs are reused.")
    p.add_argument("--out", default="runs/study", metavar="DIR", help="(default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED")
    p.add_argument("--label-noise", type=_share, nargs="+", default=[d.label_noise],
                   metavar="SHARE")
    p.add_argument("--penalty", type=_number(float, 0.0, True), nargs="+", default=[0.0],
                   metavar="WEIGHT")
    p.add_argument("--penalty-normalize", choices=["softmax", "l1"], nargs="+",
                   default=[d.penalty_normalize])
    p.add_argument("--dataset", choices=list(DATASETS), default=d.dataset)
    p.add_argument("--data-dir", metavar="DIR")
    p.add_argument("--model", choices=list(MODELS), default=d.model)
    p.add_argument("--epochs", type=_number(int, 1, True), default=d.epochs)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default=d.optimizer)
    p.add_argument("--lr", type=_number(float, 0.0, False), default=d.lr)
    p.add_argument("--train-size", type=_number(int, 1, True), metavar="N")
    p.add_argument("--device", default=d.device)
    p.set_defaults(func=_cmd_study)


def _cmd_plot(args: argparse.Namespace) -> int:
    from .plots import plot_run

    try:
        written = plot_run(args.run_dir)
    except (FileNotFoundError, ValueError) as error:
        print(f"sparsity-ext plot: error: {error}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


def _number(kind: type, minimum: float, inclusive: bool):
    """argparse type: a ``kind`` number >= (or >) ``minimum``; the message names the bound."""
    bound = f">= {minimum}" if inclusive else f"> {minimum}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text!r}") from None
        if not (value >= minimum if inclusive else value > minimum):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


def _share(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _add_train_parser(sub) -> None:
    from .data import DATASETS
    from .loop import TrainConfig
    from .models import MODELS

    defaults = TrainConfig()
    p = sub.add_parser(
        "train", help="train a small CNN while monitoring its layer-wise sparsity",
        description="Train a CNN, monitor the perplexity-based sparsity of every conv layer, "
                    "and write history.csv, metrics.csv, summary.json and PNG plots into --out. "
                    "Runs under torchrun too (DistributedDataParallel; rank 0 writes).")
    positive_int, positive = _number(int, 1, True), _number(float, 0.0, False)
    p.add_argument("--out", default=defaults.out, metavar="DIR",
                   help="output folder (default: %(default)s)")
    p.add_argument("--dataset", choices=list(DATASETS), default=defaults.dataset,
                   help="digits: scikit-learn's bundled 8x8 digits (offline, the default); "
                        "cifar10: from --data-dir")
    p.add_argument("--data-dir", metavar="DIR",
                   help="folder with the extracted CIFAR-10 python batches")
    p.add_argument("--model", choices=list(MODELS), default=defaults.model,
                   help="VGG-style or ResNet-style CNN (default: %(default)s)")
    p.add_argument("--epochs", type=positive_int, default=defaults.epochs,
                   help="(default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                   help="per process (default: %(default)s)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default=defaults.optimizer,
                   help="SGD with momentum 0.9, or Adam (default: %(default)s)")
    p.add_argument("--lr", type=positive, default=defaults.lr,
                   help="learning rate (default: 0.01 for sgd, 0.001 for adam)")
    p.add_argument("--label-noise", type=_share, default=defaults.label_noise, metavar="SHARE",
                   help="share of training labels replaced by a wrong class; the test labels "
                        "stay clean (default: %(default)s)")
    p.add_argument("--penalty", type=_number(float, 0.0, True), default=defaults.penalty,
                   metavar="WEIGHT", help="add WEIGHT x the mean sparsity of the conv layers to "
                                          "the loss (default: %(default)s)")
    p.add_argument("--penalty-normalize", choices=["softmax", "l1"],
                   default=defaults.penalty_normalize,
                   help="which sparsity the penalty lowers: the paper's softmax one or the "
                        "scale-invariant L1 one (default: %(default)s)")
    p.add_argument("--early-stop-on-sparsity", nargs="?", const="sparsity", metavar="MEASURE",
                   choices=["sparsity", "sparsity_l1"],
                   help="stop when the online signal of MEASURE (training-split sparsity, "
                        "no validation data; default measure: sparsity) fires")
    p.add_argument("--seed", type=int, default=defaults.seed, help="(default: %(default)s)")
    p.add_argument("--device", default=defaults.device,
                   help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--train-size", type=positive_int, metavar="N",
                   help="training images (default: digits 1000, cifar10 5000)")
    p.add_argument("--test-size", type=positive_int, metavar="N",
                   help="test images (default: digits all the rest, cifar10 2000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsity-ext",
        description="Perplexity-based activation sparsity (Huesmann et al., arXiv:2104.06153).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("build", help="compile the C++ (and CUDA) extension ahead of time")
    p.add_argument("--cuda", action="store_true",
                   help="compile the CUDA kernels too, even without a GPU (sm_80, sm_90 + PTX)")
    p.add_argument("--verbose", action="store_true", help="show the compiler's output")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("info", help="torch/CUDA versions, compiled devices, cache folder")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("bench", help="time ours against eager, torch.compile and the copy floor")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   help="default: every available one (cuda is the current GPU)")
    p.add_argument("--dtype", action="append",
                   choices=["float32", "bfloat16", "float16", "float64"],
                   help="repeatable; default float32 and bfloat16")
    p.add_argument("--repeats", type=_number(int, 1, True), default=15,
                   help="timed repetitions per case (median)")
    p.add_argument("--out", metavar="FILE.md", help="also write the table(s) to this markdown file")
    p.set_defaults(func=_cmd_bench)

    _add_train_parser(sub)
    _add_study_parser(sub)

    p = sub.add_parser("plot", help="redraw the PNG plots of a `train` run from its files")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a train run")
    p.set_defaults(func=_cmd_plot)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
