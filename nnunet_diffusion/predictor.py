"""DiffusionPredictor(nnUNetPredictor): seeded sampling, sample ensembles with uncertainty maps,
mirroring folded into the chain, and tile-consistent noise.

nnU-Net methods overridden (each a narrow hook; nnU-Net's sliding window, Gaussian blending,
export and multiprocessing stay untouched):

* ``initialize_from_trained_model_folder`` / ``manual_initialization``: check that the model is a
  diffusion model and apply the sampling settings to it.
* ``_internal_get_sliding_window_slicers``: remember the tiles of the current case (in the order
  nnU-Net's single producer thread feeds them), so each tile knows where it lies in the case.
* ``_internal_predict_sliding_window_return_logits``: reset the tile counter (nnU-Net re-runs it
  on the CPU after a GPU out-of-memory) and the uncertainty accumulators.
* ``_internal_maybe_mirror_and_predict``: one tile = N chains with the selected TTA mode.
* ``predict_sliding_window_return_logits``: crop the uncertainty maps like the logits.
* ``predict_from_data_iterator``: know which case (properties, output file) is being predicted,
  to write its uncertainty maps in the original image geometry.
"""
from __future__ import annotations

import itertools
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from torch._dynamo import OptimizedModule

from nnunet_diffusion.network import DiffusionUNet
from nnunet_diffusion.noise import chain_noise, linear_index
from nnunet_diffusion.sampling import p_sample_loop
from nnunet_diffusion.schedule import kept_levels

TTA_MODES = ("chain", "full", "off")


def mirror_combinations(axes: Optional[Sequence[int]]) -> List[Tuple[int, ...]]:
    """Identity first, then every non-empty combination of the (tensor) axes, as nnU-Net mirrors."""
    if not axes:
        return [()]
    return [()] + [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]


def entropy(p: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim)


class DiffusionPredictor(nnUNetPredictor):
    """nnU-Net's predictor for diffusion models.

    steps: K' levels of the sampling chain (None: the trained K). Any K' in [1, 1001] is valid
        because the network is conditioned on base levels.
    sampler: "ddpm" or "ddim" (None: the trained sampler).
    seed: the noise of sample i is the voxel-attached noise field of seed + i.
    num_samples: independent chains per tile; the prediction is their mean probability.
    uncertainty: also compute predictive entropy and mutual information per voxel.
    tta: "chain" (each step of one chain uses another mirroring), "full" (nnU-Net's: one chain per
        mirroring, K x mirrorings calls per tile) or "off". Ignored when mirroring is disabled.
    tile_consistent_noise: False gives every tile its own independent noise (as stock sliding-window
        prediction would), for measuring what the voxel-attached noise buys.
    """

    def __init__(self, *args, steps: Optional[int] = None, sampler: Optional[str] = None, seed: int = 0,
                 num_samples: int = 1, uncertainty: bool = False, tta: str = "full",
                 tile_consistent_noise: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        if steps is not None:
            kept_levels(steps)  # raises ValueError naming the bad value
        if sampler is not None and sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        if tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.steps, self.sampler, self.seed = steps, sampler, seed
        self.num_samples, self.uncertainty, self.tta = num_samples, uncertainty, tta
        self.tile_consistent_noise = tile_consistent_noise
        self._slicers: list = []
        self._volume_shape: Tuple[int, ...] = ()
        self._tile_index = 0
        self._unc_acc = self._unc_weight = None
        self.uncertainty_maps: Optional[torch.Tensor] = None  # (2, *spatial) of the last case: entropy, MI
        self._current_case: Optional[dict] = None

    # ------------------------------------------------------------------ set-up
    @property
    def diffusion_network(self) -> DiffusionUNet:
        net = self.network._orig_mod if isinstance(self.network, OptimizedModule) else self.network
        net = getattr(net, "module", net)  # DDP during final validation
        return net

    def _configure_network(self) -> None:
        net = self.diffusion_network
        if not isinstance(net, DiffusionUNet):
            raise ValueError(f"{self.trainer_name} is not a diffusion trainer (network {type(net).__name__}); "
                             f"use nnUNetv2_predict for it")
        net.sampling_steps = self.steps or net.config.num_steps
        net.sampler = self.sampler or net.config.sampler
        net.seed = self.seed

    def initialize_from_trained_model_folder(self, model_training_output_dir, use_folds,
                                             checkpoint_name='checkpoint_final.pth'):
        super().initialize_from_trained_model_folder(model_training_output_dir, use_folds, checkpoint_name)
        self._configure_network()

    def manual_initialization(self, *args, **kwargs):
        super().manual_initialization(*args, **kwargs)
        self._configure_network()

    # ------------------------------------------------------------------ sliding-window hooks
    def _internal_get_sliding_window_slicers(self, image_size):
        slicers = super()._internal_get_sliding_window_slicers(image_size)
        self._slicers, self._volume_shape = slicers, tuple(image_size)
        return slicers

    def _internal_predict_sliding_window_return_logits(self, data, slicers, do_on_device: bool = True):
        self._tile_index = 0
        if self.uncertainty:
            device = self.device if do_on_device else torch.device("cpu")
            self._unc_acc = torch.zeros((2, *data.shape[1:]), dtype=torch.float32, device=device)
            self._unc_weight = torch.zeros(data.shape[1:], dtype=torch.float32, device=device)
        return super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)

    @torch.inference_mode()
    def predict_sliding_window_return_logits(self, input_image: torch.Tensor):
        logits = super().predict_sliding_window_return_logits(input_image)
        if self.uncertainty:
            _, revert = pad_nd_image(input_image[:1], self.configuration_manager.patch_size, 'constant',
                                     {'value': 0}, True, None)
            maps = self._unc_acc / self._unc_weight.clamp_min(1e-8)
            self.uncertainty_maps = maps[(slice(None), *revert[1:])].cpu()
            self._unc_acc = self._unc_weight = None
        return logits

    def _tile_noise_index(self, x: torch.Tensor) -> torch.Tensor:
        """Linear indices of this tile's voxels in the padded case (nnU-Net feeds tiles in slicer order)."""
        if self._tile_index >= len(self._slicers):
            # called outside nnU-Net's sliding window (e.g. directly on a patch): the tile is the case
            sl, shape = tuple(slice(0, s) for s in x.shape[2:]), tuple(x.shape[2:])
        else:
            sl, shape = self._slicers[self._tile_index][1:], self._volume_shape
        self._tile_index += 1
        index = linear_index(sl, shape, x.device)
        assert tuple(index.shape) == tuple(x.shape[2:]), (index.shape, x.shape)
        return index

    def _run_chain(self, x: torch.Tensor, noise: Sequence[torch.Tensor], combos: List[Tuple[int, ...]]):
        """One chain on tile x ``(1, C_img, *tile)``; step j mirrors with combos[j % len(combos)]."""
        net = self.diffusion_network
        step = itertools.count()

        def denoise(image, xt, t):
            axes = combos[next(step) % len(combos)]
            if not axes:
                return net.denoise(image, xt, t)
            return torch.flip(net.denoise(torch.flip(image, axes), torch.flip(xt, axes), t), axes)

        return p_sample_loop(denoise, x, net.schedule, net.num_classes, sampler=net.sampler,
                             prediction=net.config.prediction, noise=[n[None] for n in noise])

    @torch.inference_mode()
    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        """Overrides nnU-Net's per-tile call: N chains per tile with the chosen TTA; returns logits
        ``(1, C, *tile)`` (for N > 1: log of the mean probabilities, so nnU-Net's softmax gives that mean)."""
        net = self.diffusion_network
        index = self._tile_noise_index(x)
        axes = [m + 2 for m in self.allowed_mirroring_axes] if (self.use_mirroring and
                                                                self.allowed_mirroring_axes) else []
        combos = mirror_combinations(axes)
        num_draws = net.schedule.num_steps
        probs_sum = entropy_sum = logits = None
        tile = self._tile_index if not self.tile_consistent_noise else 0
        for s in range(self.num_samples):
            noise = chain_noise(self.seed + s + 1_000_003 * tile, num_draws, net.num_classes, index)
            if self.tta == "full":
                logits = sum(self._run_chain(x, noise, [c]).float() for c in combos) / len(combos)
            else:
                logits = self._run_chain(x, noise, combos if self.tta == "chain" else [()]).float()
            if self.num_samples == 1 and not self.uncertainty:
                return logits
            probs = torch.softmax(logits, 1)
            probs_sum = probs if probs_sum is None else probs_sum + probs
            ent = entropy(probs, 1)
            entropy_sum = ent if entropy_sum is None else entropy_sum + ent
        mean = probs_sum / self.num_samples
        if self.uncertainty:
            total = entropy(mean, 1)[0]
            mutual_info = (total - entropy_sum[0] / self.num_samples).clamp_min(0)
            self._accumulate_uncertainty(torch.stack([total, mutual_info]))
        return logits if self.num_samples == 1 else torch.log(mean.clamp_min(1e-6))

    def _accumulate_uncertainty(self, maps: torch.Tensor) -> None:
        sl = self._slicers[self._tile_index - 1][1:] if self._tile_index - 1 < len(self._slicers) else None
        if sl is None or self._unc_acc is None:
            return
        if self.use_gaussian:
            g = compute_gaussian(tuple(self.configuration_manager.patch_size), sigma_scale=1. / 8,
                                 value_scaling_factor=10, device=self._unc_acc.device).float()
        else:
            g = torch.ones(maps.shape[1:], device=self._unc_acc.device)
        self._unc_acc[(slice(None), *sl)] += maps.to(self._unc_acc.device) * g
        self._unc_weight[sl] += g

    # ------------------------------------------------------------------ per-case bookkeeping
    def predict_from_data_iterator(self, data_iterator, save_probabilities: bool = False,
                                   num_processes_segmentation_export: int = 3):
        """Overrides nnU-Net's loop only to know the current case: wraps the iterator."""
        def tracking(iterator):
            for i, item in enumerate(iterator):
                self._current_case = item
                ofile = item.get('ofile') if isinstance(item, dict) else None
                if ofile is not None:
                    print(f"[case {i + 1}] {os.path.basename(ofile)}: {self.num_samples} sample(s) x "
                          f"{self.diffusion_network.schedule.num_steps} steps, tta {self.tta}", flush=True)
                yield item
        try:
            return super().predict_from_data_iterator(tracking(data_iterator), save_probabilities,
                                                      num_processes_segmentation_export)
        finally:
            self._current_case = None
            if hasattr(data_iterator, "_finish"):  # what nnU-Net does for a MultiThreadedAugmenter
                data_iterator._finish()

    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        logits = super().predict_logits_from_preprocessed_data(data)
        case = self._current_case
        if self.uncertainty and case is not None and case.get('ofile') is not None:
            export_uncertainty_maps(self.uncertainty_maps.numpy(), case['data_properties'], self.plans_manager,
                                    self.configuration_manager, case['ofile'],
                                    self.dataset_json['file_ending'])
        return logits


def export_uncertainty_maps(maps: np.ndarray, properties: dict, plans_manager, configuration_manager,
                            output_file_truncated: str, file_ending: str) -> List[str]:
    """Write ``CASE_entropy`` and ``CASE_mutual_info`` in the original geometry (size, spacing, origin,
    direction), undoing nnU-Net's resampling, cropping (outside the crop: 0) and transposition."""
    import SimpleITK as sitk
    if 'sitk_stuff' not in properties:
        raise ValueError("uncertainty maps need an image read with SimpleITK (nnU-Net's SimpleITKIO)")
    spacing_transposed = [properties['spacing'][i] for i in plans_manager.transpose_forward]
    current_spacing = configuration_manager.spacing if \
        len(configuration_manager.spacing) == len(properties['shape_after_cropping_and_before_resampling']) \
        else [spacing_transposed[0], *configuration_manager.spacing]
    resampled = configuration_manager.resampling_fn_probabilities(
        maps, properties['shape_after_cropping_and_before_resampling'], current_spacing, spacing_transposed)
    resampled = np.asarray(resampled.cpu() if torch.is_tensor(resampled) else resampled, dtype=np.float32)
    written = []
    for name, m in zip(("entropy", "mutual_info"), resampled):
        full = insert_crop_into_image(np.zeros(properties['shape_before_cropping'], dtype=np.float32),
                                      np.clip(m, 0, None), properties['bbox_used_for_cropping'])
        full = full.transpose(plans_manager.transpose_backward)
        if len(properties['sitk_stuff']['spacing']) == 2:
            full = full[0]
        img = sitk.GetImageFromArray(full)
        img.SetSpacing(properties['sitk_stuff']['spacing'])
        img.SetOrigin(properties['sitk_stuff']['origin'])
        img.SetDirection(properties['sitk_stuff']['direction'])
        path = f"{output_file_truncated}_{name}{file_ending}"
        sitk.WriteImage(img, path, True)
        written.append(path)
    return written
