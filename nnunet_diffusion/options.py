"""Small helpers the command-line modules share (a module of its own, so that none of them imports another)."""
from __future__ import annotations

import argparse
import os
from typing import Optional


def trainers_path() -> str:
    """Folder of the thin trainer modules to put in ``nnUNet_extTrainer``."""
    import nnunet_diffusion.trainers as trainers
    return os.path.dirname(os.path.abspath(trainers.__file__))


def int_in_range(name: str, low: int, high: Optional[int] = None):
    """argparse type: an integer >= low (and <= high), with a message naming the option and the value."""
    def parse(text: str) -> int:
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer {bound}, got {text!r}")
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{name} must be an integer {bound}, got {value}")
        return value
    return parse
