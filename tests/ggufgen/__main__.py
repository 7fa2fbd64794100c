"""Command line: ``python tests/ggufgen [--preset tiny|large] [--seed N] --out FILE``.

Prints the path, size and generation time of the written model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if not __package__:  # run as `python tests/ggufgen`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gguf import PoolingType

from ggufgen import PRESETS, write_model


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, write the model, report it."""
    parser = argparse.ArgumentParser(prog="ggufgen", description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-pooling", action="store_true", help="store no pooling type (as chat models do)"
    )
    parser.add_argument("--out", type=Path, required=True, help="the GGUF file to write")
    args = parser.parse_args(argv)
    start = time.monotonic()
    path = write_model(
        args.out, args.preset, args.seed, pooling=None if args.no_pooling else PoolingType.MEAN
    )
    elapsed = time.monotonic() - start
    print(
        f"{path}: {path.stat().st_size} bytes, preset {args.preset}, seed {args.seed}, "
        f"{elapsed:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
