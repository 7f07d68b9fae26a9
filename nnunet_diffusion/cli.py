"""The ``nnunet-diffusion`` command."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional


def trainers_path() -> str:
    """Folder of the thin trainer modules to put in ``nnUNet_extTrainer``."""
    import nnunet_diffusion.trainers as trainers
    return os.path.dirname(os.path.abspath(trainers.__file__))


def _steps(text: str) -> int:
    from nnunet_diffusion.schedule import NUM_BASE_LEVELS
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps must be an integer in [1, {NUM_BASE_LEVELS}], got {text!r}")
    if not 1 <= value <= NUM_BASE_LEVELS:
        raise argparse.ArgumentTypeError(f"--steps must be an integer in [1, {NUM_BASE_LEVELS}], got {value}")
    return value


def _cmd_schedule(args: argparse.Namespace) -> int:
    from nnunet_diffusion.schedule import Schedule, format_table
    rows = Schedule.resampled(args.steps).rows()
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"Resampled linear schedule, K = {args.steps} levels of the 1001-level base chain "
              f"(beta 1e-4 ... 0.02); c0/ct: posterior mean = c0 * x0_hat + ct * x_k")
        print(format_table(rows))
    return 0


def _cmd_trainers_path(args: argparse.Namespace) -> int:
    print(trainers_path())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunet-diffusion",
                                     description="Diffusion segmentation (Fu et al. 2023) for nnU-Net v2.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("schedule", help="print the resampled noise schedule")
    p.add_argument("--steps", type=_steps, default=5, help="number of levels K (1 ... 1001), default 5")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per level k = 1 ... K")
    p.set_defaults(func=_cmd_schedule)

    p = sub.add_parser("trainers-path", help="print the folder to export as nnUNet_extTrainer")
    p.set_defaults(func=_cmd_trainers_path)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
