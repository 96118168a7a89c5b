"""The `sparsity-ext` command line (also `python -m sparsity_ext`).

Each subcommand is one small function; the work lives in the modules they call.
"""

from __future__ import annotations

import argparse
import sys


def _cmd_build(args: argparse.Namespace) -> int:
    from . import _extension

    status = _extension.build(with_cuda=True if args.cuda else None, verbose=args.verbose)
    print(status.describe())
    return 0 if status.loaded or status.built else 1


def _cmd_info(args: argparse.Namespace) -> int:
    from . import _extension

    print(_extension.info())
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import benchmark

    benchmark.main(device=args.device, dtypes=args.dtype, repeats=args.repeats)
    return 0


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
    p.add_argument("--device", default=None, help="cpu or cuda (default: every available one)")
    p.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16", "float64"],
                   help="repeatable; default float32 and bfloat16")
    p.add_argument("--repeats", type=int, default=15, help="timed repetitions per case (median)")
    p.set_defaults(func=_cmd_bench)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
