"""DiffusionPredictor(nnUNetPredictor): seeded sampling, sample and fold ensembles with uncertainty maps,
test-time mirroring folded into the chain, per-step outputs, and tile-consistent noise.

nnU-Net methods overridden (each a narrow hook; nnU-Net's sliding window, Gaussian blending,
export and multiprocessing stay untouched):

* ``initialize_from_trained_model_folder`` / ``manual_initialization``: check that the model is a
  diffusion model and resolve the sampling settings against the ones the checkpoint recorded (not the trainer
  class's: a checkpoint of a former default predicts with its own m); with ``weights="raw"``, load every fold's
  trained weights instead of their moving average.
* ``_internal_get_sliding_window_slicers``: remember the tiles of the current case (in the order
  nnU-Net's single producer thread feeds them), so each tile knows where it lies in the case. nnU-Net passes
  the per-tile call the tile only, not its slicer, so tiles are counted; ``test_predictor.py`` pins the count
  to nnU-Net's order (it fails if nnU-Net feeds the tiles in another order).
* ``_internal_predict_sliding_window_return_logits``: reset the tile counter (nnU-Net re-runs it
  on the CPU after a GPU out-of-memory) and count the folds of the case.
* ``_internal_maybe_mirror_and_predict``: one tile = N chains with the selected TTA mode.
* ``predict_sliding_window_return_logits`` / ``predict_logits_from_preprocessed_data``: the extra maps
  (uncertainty, per-step probabilities) accumulate over every fold of a case and are cropped like the logits.
* ``predict_from_data_iterator``: know which case (properties, output file) is being predicted,
  to write its extra maps in the original image geometry.
"""
from __future__ import annotations

import itertools
import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from torch._dynamo import OptimizedModule

from nnunet_diffusion.checkpoint import raw_weights, read_checkpoint, recorded_config
from nnunet_diffusion.config import SamplingSettings
from nnunet_diffusion.network import SampledNetwork
from nnunet_diffusion.noise import chain_noise, linear_index
from nnunet_diffusion.sampling import (MirroredGroups, NetworkOutput, _batch_slice, _cat_outputs, _mean_outputs,
                                       mean_of_last, mirrored)

TTA_MODES = ("final", "chain", "full", "off", "sample")
WEIGHTS = ("average", "raw")


def mirror_combinations(axes: Optional[Sequence[int]]) -> List[Tuple[int, ...]]:
    """Identity first, then every non-empty combination of the (tensor) axes, as nnU-Net mirrors."""
    if not axes:
        return [()]
    return [()] + [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]


def entropy(p: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim)


def mirror_plan(tta: str, combos: List[Tuple[int, ...]], offset: int = 0):
    """``plan(j, k) -> mirrorings`` of step j (j = 0 at k = K) for a TTA mode; a step with several mirrorings
    averages their (un-mirrored) logits. ``offset`` shifts the cycle (sample i of an ensemble starts at i)."""
    M = len(combos)
    if tta == "off":
        return lambda j, k: [()]
    if tta == "chain":
        return lambda j, k: [combos[(j + offset) % M]]
    if tta == "final":
        return lambda j, k: combos if k == 1 else [combos[(j + offset) % M]]
    if tta == "sample":
        return lambda j, k: [combos[offset % M]]
    raise ValueError(f"no single-chain mirror plan for tta {tta!r}")


class DiffusionPredictor(nnUNetPredictor):
    """nnU-Net's predictor for diffusion models.

    steps: K' levels of the sampling chain (None: the trained K). Any K' in [1, 1001] is valid
        because the network is conditioned on base levels.
    sampler: "ddpm" or "ddim" (None: the trained sampler).
    average_last: m, the output is the mean probability of the last m steps' x0_hat (None: the trained m, as the
        checkpoint recorded it; "all": every step of the chain).
    seed: the noise of sample i of fold f is the voxel-attached noise field of seed + i + 7919 f.
    num_samples: independent chains per tile and fold; the prediction is their mean probability.
    uncertainty: also compute predictive entropy and mutual information per voxel, over all samples of all folds.
    save_steps: also write the segmentation of every step's x0_hat (``CASE_step{k}``, k = K' ... 1).
    tta: how nnU-Net's mirrorings are used (ignored when mirroring is disabled), calls per tile with K steps and
        M mirrorings: "full" K*M (one chain per mirroring, logits averaged, as nnU-Net mirrors any network),
        "final" K-1+M (one chain, each step another mirroring, the last step under all M), "chain" K (each
        step another mirroring), "off" K, "sample" K per sample: sample i runs its whole chain under mirroring
        i mod M (with ``num_samples`` = N a noise-and-mirror ensemble at N*K calls; N = 1 is "off").
    weights: "average" (the checkpoint's ``network_weights``: the trained weights, or their moving average for a
        checkpoint of a former default that kept one) or "raw" (that checkpoint's ``training_network_weights``).
    mirror_batch: most mirrored copies of a tile per network call in "full" (the M chains run side by side in
        the batch) and in "final"'s last step (None: all M in one call, halved after an out-of-memory error;
        1: one call per mirroring). Same result up to floating-point rounding.
    """

    def __init__(self, *args, steps: Optional[int] = None, sampler: Optional[str] = None,
                 average_last: Optional[Union[int, str]] = None, seed: int = 0,
                 num_samples: int = 1,
                 uncertainty: bool = False, save_steps: bool = False, tta: str = "full",
                 mirror_batch: Optional[int] = None, weights: str = "average",
                 **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        if tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
        self.weights = weights
        self._requested = dict(num_steps=steps, sampler=sampler, average_last=average_last, seed=seed)
        # the settings are validated once, here, by SamplingSettings (the trained ones fill the gaps later)
        SamplingSettings(**{"num_steps": 1001, "sampler": "ddpm", "average_last": 1,
                            **{k: v for k, v in self._requested.items() if v is not None and v != "all"}})
        self.sampling: Optional[SamplingSettings] = None
        self.chain_network: Optional[SampledNetwork] = None  # the network with the checkpoint's recorded settings
        self.denoise = None  # the denoiser, (image, x_t, t) -> logits
        self.seed, self.num_samples, self.uncertainty, self.tta = seed, num_samples, uncertainty, tta
        self.save_steps = save_steps
        if mirror_batch is not None and (isinstance(mirror_batch, bool) or not isinstance(mirror_batch, int)
                                         or mirror_batch < 1):
            raise ValueError(f"mirror_batch must be an integer >= 1 or None, got {mirror_batch!r}")
        self.mirror_batch = mirror_batch
        self._slicers: list = []
        self._volume_shape: Tuple[int, ...] = ()
        self._tile_index = 0
        self._fold_index = -1
        self._acc: Optional[dict] = None  # per-case accumulators of the extra maps, over tiles and folds
        self._in_case = False
        self.uncertainty_maps: Optional[torch.Tensor] = None  # (2, *spatial) of the last case: entropy, MI
        self.step_probabilities: Optional[torch.Tensor] = None  # (K', C, *spatial) of the last case
        self._current_case: Optional[dict] = None

    # ------------------------------------------------------------------ set-up
    @property
    def diffusion_network(self) -> SampledNetwork:
        net = self.network._orig_mod if isinstance(self.network, OptimizedModule) else self.network
        net = getattr(net, "module", net)  # DDP during final validation
        return net

    def _configure_network(self, recorded=None) -> None:
        """The chain of this predictor: the denoiser nnU-Net built and loads weights into, with the settings the
        checkpoint recorded (``recorded``: its DiffusionConfig; None: the trainer class's) and the requested
        sampling."""
        net = self.diffusion_network
        if not isinstance(net, SampledNetwork):
            raise ValueError(f"{self.trainer_name} is not a diffusion trainer (network {type(net).__name__}); "
                             f"use nnUNetv2_predict for it")
        config = recorded or net.config
        requested = dict(self._requested)
        if requested["average_last"] == "all":
            requested["average_last"] = requested["num_steps"] or config.num_steps
        self.sampling = SamplingSettings.from_config(config, **requested)
        self.chain_network = SampledNetwork(net.denoiser, config, self.sampling)
        self.denoise = net.denoiser

    def initialize_from_trained_model_folder(self, model_training_output_dir, use_folds,
                                             checkpoint_name='checkpoint_final.pth'):
        super().initialize_from_trained_model_folder(model_training_output_dir, use_folds, checkpoint_name)
        folds = [use_folds] if isinstance(use_folds, str) else list(use_folds or [])
        first = os.path.join(model_training_output_dir, f"fold_{folds[0]}", checkpoint_name) if folds else None
        recorded = recorded_config(read_checkpoint(first), first) if first and os.path.isfile(first) else None
        self._configure_network(recorded)
        if self.weights == "raw":
            self.list_of_parameters = [raw_weights(os.path.join(model_training_output_dir, f"fold_{f}",
                                                                checkpoint_name)) for f in folds]
            self.diffusion_network.load_state_dict(self.list_of_parameters[0])

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
        self._fold_index += 1
        return super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)

    def _start_case(self) -> None:
        self._acc, self._fold_index = {}, -1

    @torch.inference_mode()
    def predict_sliding_window_return_logits(self, input_image: torch.Tensor):
        own_case = not self._in_case  # called directly (not per fold from predict_logits_from_preprocessed_data)
        if own_case:
            self._start_case()
        logits = super().predict_sliding_window_return_logits(input_image)
        _, revert = pad_nd_image(input_image[:1], self.configuration_manager.patch_size, 'constant',
                                 {'value': 0}, True, None)
        self._revert = revert[1:]
        if own_case:
            self._finish_case()
        return logits

    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        """Overrides nnU-Net's per-case call (which loops over the folds) so the extra maps cover all folds."""
        self._start_case()
        self._in_case = True
        try:
            logits = super().predict_logits_from_preprocessed_data(data)
        finally:
            self._in_case = False
        self._finish_case()
        case = self._current_case
        if case is not None and case.get('ofile') is not None:
            self._export_extra_maps(case)
        return logits

    def _finish_case(self) -> None:
        """Turn the accumulated (Gaussian-weighted, fold-summed) maps into the case's maps, cropped like the logits."""
        acc, self._acc = self._acc, None
        self.uncertainty_maps = self.step_probabilities = None
        if not acc:
            return
        weight = acc.pop("weight").clamp_min(1e-8)
        crop = (slice(None), *self._revert)
        folds = sorted(int(name[6:]) for name in acc if name.startswith("probs_"))
        if folds:
            # per fold f: P_f, its Gaussian-blended mean probability. entropy = H(mean_f P_f); mutual information
            # = within-fold sample disagreement (per tile, blended, mean over folds) + between-fold disagreement
            # H(mean_f P_f) - mean_f H(P_f). Blending overlapping tiles adds nothing: with one fold and one sample
            # both terms are 0.
            per_fold = weight / len(folds)
            probs = [acc[f"probs_{f}"] / per_fold for f in folds]
            total = entropy(sum(probs) / len(probs), 0)
            between = total - sum(entropy(p, 0) for p in probs) / len(probs)
            mutual_info = torch.minimum((acc["mi_within"][0] / weight + between).clamp_min(0), total)
            self.uncertainty_maps = torch.stack([total, mutual_info])[crop].cpu()
        if "steps" in acc:
            steps = acc["steps"] / weight
            self.step_probabilities = steps.view(self.sampling.num_steps, -1, *steps.shape[1:])[(slice(None), *crop)].cpu()

    def _accumulate(self, maps: dict) -> None:
        """Add this tile's maps (each ``(n, *tile)``) into the case accumulators, Gaussian-weighted as nnU-Net
        weights the logits (same weights for every fold, so dividing by the summed weight averages the folds)."""
        index = self._tile_index - 1
        if self._acc is None or index >= len(self._slicers):
            return
        sl = self._slicers[index][1:]
        any_map = next(iter(maps.values()))
        device = any_map.device
        if self.use_gaussian:
            g = compute_gaussian(tuple(self.configuration_manager.patch_size), sigma_scale=1. / 8,
                                 value_scaling_factor=10, device=device).float()
        else:
            g = torch.ones(any_map.shape[1:], device=device)
        for name, m in maps.items():
            if name not in self._acc:
                self._acc[name] = torch.zeros((m.shape[0], *self._volume_shape), dtype=torch.float32, device=device)
            self._acc[name][(slice(None), *sl)] += m.float() * g
        if "weight" not in self._acc:
            self._acc["weight"] = torch.zeros(self._volume_shape, dtype=torch.float32, device=device)
        self._acc["weight"][sl] += g

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

    def _tile_chain(self, x: torch.Tensor, noise: Sequence[torch.Tensor], combos: List[Tuple[int, ...]],
                    offset: int, record=None) -> torch.Tensor:
        """One chain on tile x ``(1, C_img, *tile)`` with the TTA mode's mirroring, its output the mean of the last
        m steps (float32 logits ``(1, C, *tile)``). ``record(step)`` sees every step (its tensors hold one
        element per mirrored chain under ``--tta full``)."""
        chain, K = self.chain_network, self.sampling.num_steps
        groups = MirroredGroups(self.mirror_batch)
        G = len(combos) if self.tta == "full" and len(combos) > 1 else 1
        if G > 1:
            # nnU-Net's mirroring around whole chains: the G chains side by side in the batch, sharing the noise
            image = x.repeat(G, *([1] * (x.ndim - 1)))

            def denoise(xt: torch.Tensor, t: torch.Tensor) -> NetworkOutput:
                return _cat_outputs(groups(self.denoise, image, xt, t, combos))
        else:
            plan = mirror_plan(self.tta if self.tta != "full" else "off", combos, offset)
            level = {int(t): k for k, t in enumerate(chain.schedule(K).timesteps, start=1)}

            def denoise(xt: torch.Tensor, t: torch.Tensor) -> NetworkOutput:
                k = level[int(t[0])]
                mirrors = list(plan(K - k, k))
                if len(mirrors) == 1:
                    return mirrored(self.denoise, mirrors[0])(x, xt, t)
                rep = (len(mirrors), *([1] * (x.ndim - 1)))
                return _mean_outputs(groups(self.denoise, x.repeat(rep), xt.repeat(rep), t.repeat(len(mirrors)),
                                            mirrors))

        def recorded(steps):
            for step in steps:
                if record is not None:
                    record(step)
                yield step

        noise = [n[None].repeat(G, *([1] * n.ndim)) for n in noise]
        logits = mean_of_last(recorded(chain.steps(x.repeat(G, *([1] * (x.ndim - 1))), self.sampling, noise=noise,
                                                   denoise=denoise)), self.sampling.average_last)
        if G > 1:
            logits = _mean_outputs([_batch_slice(logits, g, g + 1) for g in range(G)])
        return logits.float()

    @torch.inference_mode()
    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        """Overrides nnU-Net's per-tile call: N chains per tile with the chosen TTA; returns logits
        ``(1, C, *tile)`` (for N > 1: log of the mean probabilities, so nnU-Net's softmax gives that mean)."""
        net = self.chain_network
        index = self._tile_noise_index(x)
        axes = [m + 2 for m in self.allowed_mirroring_axes] if (self.use_mirroring and
                                                                self.allowed_mirroring_axes) else []
        combos = mirror_combinations(axes)
        K = self.sampling.num_steps
        fold = max(self._fold_index, 0)
        want_maps = self.uncertainty or self.save_steps
        probs_sum = entropy_sum = logits = None
        step_probs = torch.zeros((K, net.num_classes, *x.shape[2:]), device=x.device) if self.save_steps else None

        def record(step):
            # mean over the batch: one tile, or one tile per chain of --tta full
            step_probs[K - step.k] += step.probs.mean(0) / self.num_samples

        for s in range(self.num_samples):
            noise = chain_noise(self.seed + s + 7919 * fold, K, net.num_classes, index)
            logits = self._tile_chain(x, noise, combos, s, record if step_probs is not None else None)
            if self.num_samples == 1 and not want_maps:
                return logits
            probs = torch.softmax(logits, 1)
            probs_sum = probs if probs_sum is None else probs_sum + probs
            ent = entropy(probs, 1)
            entropy_sum = ent if entropy_sum is None else entropy_sum + ent
        mean = probs_sum / self.num_samples
        maps = {}
        if self.uncertainty:
            maps[f"probs_{fold}"] = mean[0]
            maps["mi_within"] = (entropy(mean, 1) - entropy_sum / self.num_samples).clamp_min(0)
        if step_probs is not None:
            maps["steps"] = step_probs.flatten(0, 1)
        self._accumulate(maps)
        return logits if self.num_samples == 1 else torch.log(mean.clamp_min(1e-6))

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
                          f"{self.sampling.num_steps} steps, tta {self.tta}", flush=True)
                yield item
        try:
            return super().predict_from_data_iterator(tracking(data_iterator), save_probabilities,
                                                      num_processes_segmentation_export)
        finally:
            self._current_case = None
            if hasattr(data_iterator, "_finish"):  # what nnU-Net does for a MultiThreadedAugmenter
                data_iterator._finish()

    def _export_extra_maps(self, case: dict) -> None:
        if self.uncertainty and self.uncertainty_maps is not None:
            export_uncertainty_maps(self.uncertainty_maps.numpy(), case['data_properties'], self.plans_manager,
                                    self.configuration_manager, case['ofile'], self.dataset_json['file_ending'])
        if self.save_steps and self.step_probabilities is not None:
            from nnunetv2.inference.export_prediction import export_prediction_from_logits
            for j, probs in enumerate(self.step_probabilities):
                k = self.sampling.num_steps - j
                export_prediction_from_logits(torch.log(probs.clamp_min(1e-8)), case['data_properties'],
                                              self.configuration_manager, self.plans_manager, self.dataset_json,
                                              f"{case['ofile']}_step{k}", False)

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
