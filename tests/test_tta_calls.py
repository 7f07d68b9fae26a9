"""Test-time mirroring folded into the chain (``--tta chain`` and ``--tta final``): every network call's level t and
mirroring, recorded on the denoiser itself, against the modes' definitions written out here (not ``mirror_plan``).

Definitions (README, ``nnUNetv2_predict_diffusion --help``), steps j = 0 ... K-1 from the noisiest level down, nnU-Net's
M mirrorings in nnU-Net's order (identity first, then every non-empty combination of the axes):
  chain: step j is one call under mirroring j mod M;
  final: steps K ... 2 as in chain, the last step (t = 0) under all M mirrorings.
"""
import os

import pytest
import torch

from nnunet_diffusion.network import DiffusionUNet
from nnunet_diffusion.predictor import DiffusionPredictor

# tensor axes of a (B, C, x, y, z) tile, mirrorings in nnU-Net's order
MIRRORINGS_3D = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
# K = 10: base levels round(linspace(0, 1000, 10)), noisiest first
LEVELS_K10 = [1000, 889, 778, 667, 556, 444, 333, 222, 111, 0]


class DenoiserCalls:
    """Records each evaluation of the predictor's denoiser (``DiffusionUNet`` called as ``(image, xt, t)``): one
    ``(t, image)`` per batch element, in call order."""

    def __init__(self, predictor: DiffusionPredictor):
        nets = [m for m in predictor.network.modules() if isinstance(m, DiffusionUNet)]
        assert len(nets) == 1, nets
        self.net, self.evaluations, self._inside = nets[0], [], False
        self.net.register_forward_pre_hook(self._before, with_kwargs=True)
        self.net.register_forward_hook(lambda *_: setattr(self, "_inside", False))
        if callable(getattr(self.net, "denoise", None)):
            # a sampler may call the module's denoising method rather than the module; record it there as well,
            # once per evaluation (not again when the module's forward delegates to it)
            method = self.net.denoise

            def denoise(image, xt, t):
                if not self._inside:
                    self._record(image, t)
                return method(image, xt, t)
            self.net.denoise = denoise

    def _before(self, module, args, kwargs):
        values = dict(zip(("image", "xt", "t"), args), **kwargs)
        if values.get("xt") is not None:
            self._inside = True
            self._record(values["image"], values["t"])

    def _record(self, image, t):
        assert t.dtype == torch.long and t.shape == (image.shape[0],)
        self.evaluations += [(int(level), img.clone()) for level, img in zip(t, image)]

    def steps(self, tile: torch.Tensor):
        """Per step (consecutive evaluations at one level): ``(t, [mirroring of each evaluation])``, the mirroring
        found by comparing the network's image with every flip of the tile ``(C, *spatial)``."""
        steps = []
        for level, image in self.evaluations:
            flips = [axes for axes in MIRRORINGS_3D
                     if torch.equal(image, torch.flip(tile, [a - 1 for a in axes]) if axes else tile)]
            assert len(flips) == 1, f"the image at t={level} is no single flip of the tile: {flips}"
            if not steps or steps[-1][0] != level:
                steps.append((level, []))
            steps[-1][1].append(flips[0])
        return steps


def _predictor(trained_3d, tta, mirror_batch=None):
    p = DiffusionPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                           perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                           allow_tqdm=False, tta=tta, steps=10, mirror_batch=mirror_batch)
    p.initialize_from_trained_model_folder(os.path.dirname(trained_3d), (0,), "checkpoint_final.pth")
    assert tuple(p.allowed_mirroring_axes) == (0, 1, 2)  # M = 8
    return p


def _one_tile(p):
    """A random image of exactly one patch: nnU-Net's sliding window makes it a single tile."""
    return torch.randn(1, *p.configuration_manager.patch_size, generator=torch.Generator().manual_seed(0))


def test_chain_mode_calls_step_j_under_mirroring_j_mod_m(inproc, trained_3d):
    p = _predictor(trained_3d, "chain")
    calls = DenoiserCalls(p)
    tile = _one_tile(p)
    p.predict_sliding_window_return_logits(tile)
    expected = [(t, [MIRRORINGS_3D[j % 8]]) for j, t in enumerate(LEVELS_K10)]
    assert calls.steps(tile) == expected  # K = 10 > M = 8: steps 8 and 9 wrap round to () and (2,)


@pytest.mark.parametrize("mirror_batch", [None, 3])
def test_final_mode_mirrors_the_last_step_only_under_every_mirroring(inproc, trained_3d, mirror_batch):
    p = _predictor(trained_3d, "final", mirror_batch)
    calls = DenoiserCalls(p)
    tile = _one_tile(p)
    p.predict_sliding_window_return_logits(tile)
    steps = calls.steps(tile)
    assert steps[:-1] == [(t, [MIRRORINGS_3D[j % 8]]) for j, t in enumerate(LEVELS_K10[:-1])]
    last_level, last_mirrorings = steps[-1]
    assert last_level == 0
    assert sorted(last_mirrorings) == sorted(MIRRORINGS_3D)  # each of the M mirrorings once, in any order
