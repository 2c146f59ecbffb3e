"""Ahead-of-time build: ``python -m marginops.build [--cuda] [--verbose]``.

Compiles the C++ extension (and with --cuda the CUDA one) into the cache that first use would
fill, prints where it is, exits non-zero with the reason on failure.
"""

from __future__ import annotations

import argparse
import sys

from ._build import BuildError, cuda_arch_list, load_cpu, load_cuda


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m marginops.build", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cuda",
        action="store_true",
        help="also build the CUDA kernels (needs nvcc and a CUDA build of torch; no GPU needed)",
    )
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    try:
        print(f"marginops: C++ extension ready: {load_cpu(args.verbose)}")
        if args.cuda:
            print(f"marginops: CUDA extension ready (archs {cuda_arch_list()}): {load_cuda(args.verbose)}")
    except BuildError as exc:
        print(f"marginops: build failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
