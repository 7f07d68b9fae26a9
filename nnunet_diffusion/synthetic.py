"""Tiny synthetic datasets in nnU-Net raw layout, for tests and quick checks.

Each case is a noisy image with two blobs (labels 1 and 2) whose brightness tells
them apart, so a few training iterations already learn something.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
import SimpleITK as sitk


def _write(array: np.ndarray, path: str, spacing: Sequence[float]) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    sitk.WriteImage(img, path)


def make_synthetic_dataset(raw_root: str, dataset_id: int = 990, name: str = "Synthetic", num_cases: int = 8,
                           shape: Sequence[int] = (20, 24, 20), spacing: Sequence[float] = (1.0, 1.0, 1.0),
                           num_channels: int = 1, seed: int = 0) -> str:
    """Write ``Dataset{id:03d}_{name}`` under ``raw_root`` and return its folder.

    shape/spacing are (z, y, x) for 3D or (y, x) with a leading 1 for 2D-like data.
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{name}")
    os.makedirs(os.path.join(folder, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(folder, "labelsTr"), exist_ok=True)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=0).astype(np.float32)
    for i in range(num_cases):
        label = np.zeros(shape, dtype=np.uint8)
        for cls in (1, 2):
            center = np.array([rng.uniform(0.3 * s, 0.7 * s) for s in shape], dtype=np.float32)
            radius = rng.uniform(0.15, 0.25) * min(shape)
            dist = np.sqrt(((grid - center.reshape((-1,) + (1,) * len(shape))) ** 2).sum(0))
            label[(dist < radius) & (label == 0)] = cls
        case = f"case_{i:03d}"
        for c in range(num_channels):
            image = rng.normal(0, 0.3, shape).astype(np.float32) + 1.0 * (label == 1) + 2.0 * (label == 2) + c
            _write(image, os.path.join(folder, "imagesTr", f"{case}_{c:04d}.nii.gz"), spacing)
        _write(label, os.path.join(folder, "labelsTr", f"{case}.nii.gz"), spacing)
    dataset_json = {
        "channel_names": {str(c): f"synthetic{c}" for c in range(num_channels)},
        "labels": {"background": 0, "one": 1, "two": 2},
        "numTraining": num_cases,
        "file_ending": ".nii.gz",
        "name": name,
    }
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(dataset_json, f, indent=1)
    return folder
