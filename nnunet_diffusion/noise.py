"""Counter-based Gaussian noise attached to voxels of the whole (padded) case.

``field_noise(seed, draw, channels, coords)`` gives the same value for the same
(seed, draw, channel, voxel) wherever the voxel is asked for, so overlapping
sliding-window tiles see identical noise in their overlap, and the result does not
depend on tile order, worker counts or the device. Values come from a splitmix64
hash of the voxel's linear index (two hashes -> Box-Muller), so no case-sized
buffer is ever allocated.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import torch

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= (1 << 63) else value


_C1 = _signed(0xBF58476D1CE4E5B9)
_C2 = _signed(0x94D049BB133111EB)
_GOLDEN = _signed(0x9E3779B97F4A7C15)


def _lshr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser; int64 arithmetic wraps modulo 2^64."""
    x = x ^ _lshr(x, 30)
    x = x * _C1
    x = x ^ _lshr(x, 27)
    x = x * _C2
    return x ^ _lshr(x, 31)


def _mix_int(x: int) -> int:
    x &= _MASK64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK64
    return _signed(x ^ (x >> 31))


def _uniform(index: torch.Tensor, key: int) -> torch.Tensor:
    """Uniform in (0, 1), float64, one per element of ``index``."""
    h = _mix(index * _GOLDEN + key)
    return (_lshr(h, 11).double() + 0.5) * (2.0 ** -53)


def linear_index(slicer: Sequence[Union[slice, int]], volume_shape: Sequence[int],
                 device: torch.device) -> torch.Tensor:
    """Linear voxel indices (int64) of the region ``slicer`` selects in a volume of ``volume_shape``.

    ``slicer`` has one entry per spatial axis: a slice (kept axis) or an int (an axis the tile
    does not have, e.g. the slice index of a 2D tile in a 3D case). Returns the kept axes' shape.
    """
    if len(slicer) != len(volume_shape):
        raise ValueError(f"slicer {slicer} does not match volume shape {tuple(volume_shape)}")
    index = torch.zeros((), dtype=torch.int64, device=device)
    kept = 0
    for sl, size in zip(slicer, volume_shape):
        if isinstance(sl, slice):
            start, stop, step = sl.indices(size)
            coords = torch.arange(start, stop, step, dtype=torch.int64, device=device)
            index = index.unsqueeze(-1) * size + coords.view(*([1] * kept), -1)
            kept += 1
        else:
            index = index * size + int(sl)
    return index


def field_noise(seed: int, draw: int, num_channels: int, index: torch.Tensor,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise ``(num_channels, *index.shape)`` for voxels ``index`` (see :func:`linear_index`)."""
    out = []
    for c in range(num_channels):
        key = _mix_int(_mix_int(_mix_int(seed) + draw) + c)
        u1 = _uniform(index, key)
        u2 = _uniform(index, _mix_int(key + 1))
        out.append(torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2))
    return torch.stack(out).to(dtype)


def chain_noise(seed: int, num_draws: int, num_channels: int, index: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The ``num_draws`` noise tensors of one sampling chain (x_K first, then one z per step)."""
    return tuple(field_noise(seed, d, num_channels, index) for d in range(num_draws))
