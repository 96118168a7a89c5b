"""The commands of ``sparsity-ext`` (also ``python -m sparsity_ext``), run on parsed arguments.

The arguments are defined and checked in the top-level module :mod:`sparsity_ext_cli`, which
imports no torch; :func:`run` gets its namespace. Each command is one small function; the
work lives in the modules they call. A run that cannot start as configured
(:class:`~sparsity_ext.app.errors.ConfigError`) or a run folder that cannot be read
(:class:`~sparsity_ext.app.errors.RunFileError`) exits with 2 and one line saying why.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from .errors import ConfigError, RunFileError

__all__ = ["main", "run"]


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
    from .loop import resolve_device

    if args.device is not None:
        resolve_device(args.device)  # the same availability check as `train --device`
    benchmark.main(device=args.device, dtypes=args.dtype, repeats=args.repeats,
                   processes=args.processes, out=args.out)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .loop import TrainConfig, train

    # Every train flag is a TrainConfig field of the same name.
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    # A progress bar in a piped log is hundreds of lines of escape codes.
    given["progress"] = not args.no_progress and sys.stderr.isatty()
    train(TrainConfig(**given))
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .loop import TrainConfig
    from .study import run_study, study_configs

    names = ("dataset", "data_dir", "model", "epochs", "optimizer", "lr", "device", "train_size")
    base = TrainConfig(**{name: getattr(args, name) for name in names})
    configs = study_configs(
        base, Path(args.out), args.seeds, args.label_noise, args.penalty, args.penalty_normalize
    )
    run_study(configs, Path(args.out))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .plots import plot_run

    written = plot_run(args.run_dir)
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


COMMANDS = {
    "build": _cmd_build,
    "info": _cmd_info,
    "bench": _cmd_bench,
    "train": _cmd_train,
    "plot": _cmd_plot,
    "study": _cmd_study,
}


def run(args: argparse.Namespace) -> int:
    """Run the command ``args.command`` with its parsed arguments; returns the exit status."""
    try:
        return int(COMMANDS[args.command](args) or 0)
    except (ConfigError, RunFileError) as error:
        print(f"sparsity-ext {args.command}: error: {error}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (see :mod:`sparsity_ext_cli`) and run the command."""
    from sparsity_ext_cli import main as cli_main

    return cli_main(argv)
