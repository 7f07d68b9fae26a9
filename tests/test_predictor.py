"""DiffusionPredictor and nnUNetv2_predict_diffusion on a real (tiny) trained model."""
import glob
import math
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import BIN, DATASET, TR, run
from nnunet_diffusion.noise import linear_index
from nnunet_diffusion.predictor import DiffusionPredictor


@pytest.fixture
def trained(inproc, trained_3d):
    return trained_3d


def _predictor(trained_3d, **kw):
    kw.setdefault("use_mirroring", True)
    p = DiffusionPredictor(tile_step_size=0.5, use_gaussian=True, perform_everything_on_device=False,
                           device=torch.device("cpu"), verbose=False, allow_tqdm=False,
                           use_mirroring=kw.pop("use_mirroring"), **kw)
    p.initialize_from_trained_model_folder(os.path.dirname(trained_3d), (0,), "checkpoint_final.pth")
    return p


class CallCounter:
    """Counts the predictor's denoiser calls and evaluations (batch elements: one tile each, mirrored or not)."""
    def __init__(self, p):
        self.denoise, self.calls, self.evaluations = p.denoise, 0, 0
        p.denoise = self

    def __call__(self, *a):
        self.calls += 1
        self.evaluations += a[0].shape[0]
        return self.denoise(*a)


@pytest.mark.parametrize("tta,evaluations,batched_calls,mirror_batch", [
    ("chain", 5, 5, None), ("final", 5 - 1 + 8, 5, None), ("final", 5 - 1 + 8, 5, 1), ("full", 5 * 8, 5, None),
    ("off", 5, 5, None)])
def test_network_calls_per_tile(trained, tta, evaluations, batched_calls, mirror_batch):
    p = _predictor(trained, tta=tta, mirror_batch=mirror_batch)
    counter = CallCounter(p)
    image = torch.randn(1, 30, 30, 24)  # larger than the 20x24x20 patch: several tiles
    p.predict_sliding_window_return_logits(image)
    n_tiles = len(p._slicers)
    assert n_tiles > 1
    assert counter.evaluations == evaluations * n_tiles
    # batched mirroring: all mirrored copies of a step in one call; mirror_batch=1: one call per copy
    assert counter.calls == (batched_calls if mirror_batch is None else evaluations) * n_tiles


def _position_net(num_classes=3):
    """A network that is not mirror-symmetric: its logits are a ramp along every spatial axis plus a term of the
    step's x_t, so an output that is not flipped back (or flipped twice) differs from the un-mirrored one."""
    def fn(image, xt, t):
        grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in image.shape[2:]], indexing="ij")
        ramp = sum((d + 1) * g for d, g in enumerate(grids))
        logits = torch.stack([ramp * (c - 1) * 0.05 for c in range(num_classes)])[None]
        return logits + 0.1 * image[:, :1] + 0.01 * xt
    return fn


def _reference_chain(fn, x, noise, schedule, plan):
    """An independent loop: step j applies ``plan(j, k)`` mirrorings by hand, DDPM update, last step's logits."""
    xt = noise[0][None]
    K = schedule.num_steps
    for j, k in enumerate(range(K, 0, -1)):
        outs = []
        for axes in plan(j, k):
            o = fn(torch.flip(x, axes) if axes else x, torch.flip(xt, axes) if axes else xt,
                   torch.full((1,), int(schedule.timesteps[k - 1])))
            outs.append(torch.flip(o, axes) if axes else o)
        logits = sum(outs) / len(outs)
        if k == 1:
            return logits
        x0_hat = 2 * torch.softmax(logits, 1) - 1
        i = k - 1
        xt = schedule.posterior_coef_x0[i] * x0_hat + schedule.posterior_coef_xt[i] * xt + \
            schedule.posterior_variance[i] ** 0.5 * noise[K - k + 1][None]
        xt = xt.float()


def _predict_one_tile(p, dim):
    """One whole-patch tile through the predictor's per-tile call, mirroring along every spatial axis."""
    spatial = (20, 24, 20) if dim == 3 else (24, 20)
    x = torch.randn(1, 1, *spatial)
    axes = [2, 3, 4] if dim == 3 else [2, 3]
    p.allowed_mirroring_axes = tuple(a - 2 for a in axes)
    p._slicers = []
    return x, spatial, axes, p._internal_maybe_mirror_and_predict(x)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("tta,mirror_batch", [("off", None), ("chain", None), ("final", None), ("final", 1),
                                              ("final", 3), ("full", None), ("full", 1), ("full", 3)])
def test_tta_modes_unmirror_outputs(trained, tta, mirror_batch, dim):
    """Each mode's output equals an independent reference loop that flips inputs and outputs by hand, on a
    network whose output depends on position (a missing flip-back changes it), K = 5, 2D and 3D; batched
    mirroring (all copies in one call, 3 per call, or one per call) gives the same result."""
    from nnunet_diffusion.noise import chain_noise
    from nnunet_diffusion.predictor import mirror_combinations, mirror_plan
    # the reference loop returns the last step's logits (the trained default averages all steps)
    p = _predictor(trained, tta=tta, mirror_batch=mirror_batch, average_last=1)
    fn = _position_net()
    p.denoise = fn
    x, spatial, axes, out = _predict_one_tile(p, dim)
    combos = mirror_combinations(axes)
    noise = chain_noise(0, 5, 3, linear_index(tuple(slice(0, s) for s in spatial), spatial, torch.device("cpu")))
    schedule = p.chain_network.schedule(5)
    if tta == "full":
        expected = sum(_reference_chain(fn, x, noise, schedule, lambda j, k, c=c: [c]) for c in combos) / len(combos)
    else:
        expected = _reference_chain(fn, x, noise, schedule, mirror_plan(tta, combos))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    if tta != "off":  # and mirroring matters for this network: the un-mirrored chain differs
        plain = _reference_chain(fn, x, noise, schedule, mirror_plan("off", combos))
        assert not torch.allclose(out, plain, atol=1e-3)


@pytest.mark.parametrize("dim", [2, 3])
def test_sample_mode_runs_each_sample_under_its_own_mirroring(trained, dim):
    """--tta sample --num-samples N: sample i is one whole chain under mirroring i mod M with its own noise; the
    output is the log of the samples' mean probability (checked against hand-flipped reference chains)."""
    from nnunet_diffusion.noise import chain_noise
    from nnunet_diffusion.predictor import mirror_combinations
    n = 3
    p = _predictor(trained, tta="sample", num_samples=n, average_last=1)
    counter = CallCounter(p)
    fn = _position_net()
    counter.denoise = fn
    x, spatial, axes, out = _predict_one_tile(p, dim)
    assert counter.evaluations == counter.calls == n * 5
    combos = mirror_combinations(axes)
    index = linear_index(tuple(slice(0, s) for s in spatial), spatial, torch.device("cpu"))
    schedule = p.chain_network.schedule(5)
    probs = [torch.softmax(_reference_chain(fn, x, chain_noise(i, 5, 3, index), schedule,
                                            lambda j, k, c=combos[i]: [c]), 1) for i in range(n)]
    torch.testing.assert_close(out, torch.log((sum(probs) / n).clamp_min(1e-6)), rtol=1e-4, atol=1e-4)


def test_overlapping_tiles_receive_identical_noise(trained, monkeypatch):
    p = _predictor(trained, tta="off")
    records = []
    orig = p._tile_chain

    def recording(x, noise, combos, offset, record=None):
        records.append((p._slicers[p._tile_index - 1][1:], [n.clone() for n in noise]))
        return orig(x, noise, combos, offset, record)

    monkeypatch.setattr(p, "_tile_chain", recording)
    p.predict_sliding_window_return_logits(torch.randn(1, 30, 30, 24))
    volume = torch.zeros(len(records[0][1]), 3, *p._volume_shape)
    filled = torch.zeros(p._volume_shape, dtype=torch.bool)
    overlaps = 0
    for sl, noise in records:
        stacked = torch.stack(noise)
        region = volume[(slice(None), slice(None), *sl)]
        seen_before = filled[sl]
        if seen_before.any():
            overlaps += 1
            assert torch.equal(region[..., seen_before], stacked[..., seen_before])
        volume[(slice(None), slice(None), *sl)] = stacked
        filled[sl] = True
    assert overlaps > 0
    # and the noise is not the same everywhere: distinct voxels get distinct values
    assert volume[0, 0][filled].unique().numel() > 0.99 * filled.sum()


def test_linear_index_of_2d_tile_in_3d_case():
    idx = linear_index((3, slice(2, 5), slice(0, 4)), (6, 7, 8), torch.device("cpu"))
    assert idx.shape == (3, 4)
    assert idx[0, 0] == (3 * 7 + 2) * 8 and idx[2, 3] == (3 * 7 + 4) * 8 + 3


def test_certain_identical_samples_give_zero_mutual_information(trained):
    p = _predictor(trained, tta="off", num_samples=3, uncertainty=True)

    def certain(image, xt, t):  # ignores the noise: every sample is the same, with certainty
        logits = torch.zeros(image.shape[0], 3, *image.shape[2:])
        logits[:, 1] = 50.0
        return logits

    p.denoise = certain
    p.predict_sliding_window_return_logits(torch.randn(1, 30, 30, 24))
    entropy_map, mi = p.uncertainty_maps
    assert mi.abs().max() < 1e-6 and entropy_map.max() < 1e-6


def test_tiles_arrive_in_the_order_of_nnunets_slicers(trained, monkeypatch):
    """nnU-Net gives the per-tile call the tile only; the predictor counts the calls to know where a tile lies (its
    noise is attached to those voxels). Pinned here: every tile nnU-Net feeds is the padded case at the slicer the
    count points to, for every tile of a case, so a change of nnU-Net's order (or of its slicers) fails."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    p = _predictor(trained, tta="off")
    image = torch.randn(1, 30, 30, 24)
    seen = []
    orig = p._tile_chain

    def recording(x, noise, combos, offset, record=None):
        seen.append((p._slicers[p._tile_index - 1], x[0].clone()))
        return orig(x, noise, combos, offset, record)

    monkeypatch.setattr(p, "_tile_chain", recording)
    p.predict_sliding_window_return_logits(image)
    data, _ = pad_nd_image(image, p.configuration_manager.patch_size, "constant", {"value": 0}, True, None)
    assert len(seen) == len(p._slicers) > 1
    assert len({str(sl) for sl, _ in seen}) == len(seen)  # each slicer once
    for sl, tile in seen:
        assert torch.equal(tile, data[sl])


def test_predictor_samples_with_the_settings_the_checkpoint_recorded(trained, tmp_path):
    """The predictor reads m (average_last) from the checkpoint, not from the trainer class nnU-Net builds the
    network with: a checkpoint recording m = 1 predicts the last step with -tr DiffusionTrainer (m = 5)."""
    model = tmp_path / "model"
    shutil.copytree(os.path.dirname(trained), model, ignore=shutil.ignore_patterns("validation", "*.png"))
    ck = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ck["diffusion"]["average_last"] == 5
    ck["diffusion"]["average_last"] = 1
    torch.save(ck, model / "fold_0" / "checkpoint_m1.pth")
    samplings = {}
    for name in ("checkpoint_final.pth", "checkpoint_m1.pth"):
        p = DiffusionPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
        p.initialize_from_trained_model_folder(str(model), (0,), name)
        samplings[name] = p.sampling
        assert p.chain_network.denoiser is p.diffusion_network.denoiser  # the weights nnU-Net loads are used
    assert samplings["checkpoint_final.pth"].average_last == 5 and samplings["checkpoint_m1.pth"].average_last == 1


def _predict(env, trained_3d, inp, out, *extra):
    return run([f"{BIN}/nnUNetv2_predict_diffusion", "-i", str(inp), "-o", str(out), "-d", "990", "-c",
                "3d_fullres", "-f", "0", "-tr", "DiffusionTrainer_2ep3it", "-device", "cpu", *extra], env=env)


@pytest.fixture
def predict_main(inproc, trained_3d, monkeypatch):
    """``nnUNetv2_predict_diffusion`` as ``predict_cli.main`` in this process (the installed command runs that same
    function): the tests of its options and defaults without an interpreter start-up per call. nnU-Net reads
    nnUNet_results when first imported, so the model folder's root is set where the command looks it up."""
    import nnunetv2.utilities.file_path_utilities as paths

    from nnunet_diffusion.predict_cli import main
    monkeypatch.setattr(paths, "nnUNet_results", inproc["nnUNet_results"])
    threads = torch.get_num_threads()

    def predict(inp, out, *extra):
        try:  # the command sets torch's threads for the CPU: give this process its own back
            rc = main(["-i", str(inp), "-o", str(out), "-d", DATASET, "-c", "3d_fullres", "-f", "0", "-tr", TR,
                       "-device", "cpu", "--disable_progress_bar", *extra])
        finally:
            torch.set_num_threads(threads)
        assert rc == 0
    return predict


@pytest.fixture(scope="module")
def inputs(env, tmp_path_factory):
    inp = tmp_path_factory.mktemp("in")
    for case in ("case_003", "case_007"):
        shutil.copy(os.path.join(env["raw"], "imagesTr", f"{case}_0000.nii.gz"), inp)
    return inp


def _arrays(folder):
    return {os.path.basename(f): sitk.GetArrayFromImage(sitk.ReadImage(f))
            for f in sorted(glob.glob(os.path.join(folder, "*.nii.gz")))}


def test_seeded_prediction_is_bit_identical_and_seed_dependent(env, trained_3d, inputs, predict_main, tmp_path):
    """The same seed gives the same files whatever the process layout (nnU-Net's sequential mode, -npp/-nps 0, in
    this process, against the installed command with 2 preprocessing and 2 export workers), given the same number of
    torch threads; another seed gives other probabilities.

    The thread count is part of the promise: CPU convolution kernels may split their sums by thread, so another
    count may round differently, and the chain carries that on. On an Intel Xeon with 2 cores ~20 of 28,800 saved
    probabilities came out up to 1.7e-4 apart (segmentations identical) while the command predicted with 1 thread
    (nnUNet_def_n_proc=1 in ``env``) and this process with 2. nnU-Net caps prediction and export threads at
    nnUNet_def_n_proc, read when nnunetv2 is imported, so the command gets this process's value."""
    from nnunetv2.configuration import default_num_processes
    same_threads = dict(env, nnUNet_def_n_proc=str(default_num_processes))
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    predict_main(inputs, a, "--seed", "3", "--save_probabilities", "-npp", "0", "-nps", "0")
    _predict(same_threads, trained_3d, inputs, b, "--seed", "3", "--save_probabilities", "-npp", "2", "-nps", "2")
    predict_main(inputs, c, "--seed", "4", "--save_probabilities", "-npp", "0", "-nps", "0")
    for name in ("case_003.nii.gz", "case_007.nii.gz"):
        assert open(a / name, "rb").read() == open(b / name, "rb").read()
    for case in ("case_003", "case_007"):
        pa = np.load(a / f"{case}.npz")["probabilities"]
        assert np.array_equal(pa, np.load(b / f"{case}.npz")["probabilities"])
        assert not np.array_equal(pa, np.load(c / f"{case}.npz")["probabilities"])


def test_default_is_one_mirroring_per_step_and_the_mean_of_all_steps(inputs, predict_main, tmp_path):
    """The measured default of nnUNetv2_predict_diffusion (README, prediction study): --tta chain with the mean
    probability of all K steps; it differs from the last step's output (--average-last 1) and from no
    mirroring (--tta off)."""
    runs = {"default": (), "explicit": ("--tta", "chain", "--average-last", "5"),
            "last": ("--tta", "chain", "--average-last", "1"), "off": ("--tta", "off", "--average-last", "5")}
    probs = {}
    for name, extra in runs.items():
        # sequential mode (-npp/-nps 0): no worker processes to start, same files (seeded test above)
        predict_main(inputs, tmp_path / name, "--save_probabilities", "-npp", "0", "-nps", "0", *extra)
        probs[name] = np.load(tmp_path / name / "case_003.npz")["probabilities"]
    assert np.array_equal(probs["default"], probs["explicit"])
    assert not np.allclose(probs["default"], probs["last"], atol=1e-4)
    assert not np.allclose(probs["default"], probs["off"], atol=1e-4)


def test_samples_and_uncertainty_maps(env, trained_3d, inputs, tmp_path):
    out = tmp_path / "u"
    _predict(env, trained_3d, inputs, out, "--num-samples", "3", "--uncertainty", "--save_probabilities",
             "--steps", "3", "-npp", "1", "-nps", "1")
    for case in ("case_003", "case_007"):
        seg = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        probs = np.load(out / f"{case}.npz")["probabilities"]
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-3)
        # the segmentation is the argmax of the saved mean probabilities
        assert np.array_equal(sitk.GetArrayFromImage(seg), probs.argmax(0))
        for name in ("entropy", "mutual_info"):
            m = sitk.ReadImage(str(out / f"{case}_{name}.nii.gz"))
            assert m.GetSize() == seg.GetSize() and m.GetSpacing() == seg.GetSpacing()
            assert m.GetOrigin() == seg.GetOrigin() and m.GetDirection() == seg.GetDirection()
        ent = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}_entropy.nii.gz")))
        mi = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}_mutual_info.nii.gz")))
        assert ent.min() >= 0 and ent.max() <= math.log(3) + 1e-4
        assert mi.min() >= 0 and np.all(mi <= ent + 1e-4)
        assert mi.max() > 0  # an untrained-ish model disagrees with itself somewhere


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "--steps must be an integer in [1, 1001], got 0"),
    (["--steps", "-3"], "--steps must be an integer in [1, 1001], got -3"),
    (["--steps", "1002"], "--steps must be an integer in [1, 1001], got 1002"),
    (["--steps", "2.5"], "--steps must be an integer in [1, 1001], got '2.5'"),
    (["--mirror-batch", "0"], "--mirror-batch must be an integer >= 1, got 0"),
])
def test_invalid_options_are_refused(tmp_path, capsys, args, message):
    """The command's own parser (in process: what the installed entry point runs first)."""
    from nnunet_diffusion.predict_cli import main
    with pytest.raises(SystemExit) as e:
        main(["-i", str(tmp_path), "-o", str(tmp_path / "x"), "-d", "990", "-c", "3d_fullres", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_invalid_option_through_the_installed_command(env, trained_3d, inputs, tmp_path):
    proc = run([f"{BIN}/nnUNetv2_predict_diffusion", "-i", str(inputs), "-o", str(tmp_path / "x"), "-d", "990",
                "-c", "3d_fullres", "-f", "0", "-tr", "DiffusionTrainer_2ep3it", "-device", "cpu",
                "--num-samples", "0"], env=env, check=False)
    assert proc.returncode == 2
    assert "--num-samples must be an integer >= 1, got 0" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_wrong_channel_count_is_refused(env, trained_3d, inputs, tmp_path):
    inp = tmp_path / "in2"
    shutil.copytree(inputs, inp)
    shutil.copy(inp / "case_003_0000.nii.gz", inp / "case_003_0001.nii.gz")
    proc = run([f"{BIN}/nnUNetv2_predict_diffusion", "-i", str(inp), "-o", str(tmp_path / "x"), "-d", "990", "-c",
                "3d_fullres", "-f", "0", "-tr", "DiffusionTrainer_2ep3it", "-device", "cpu"], env=env, check=False)
    assert proc.returncode == 1
    assert "case case_003 has 2 channel file(s) but the model expects 1" in proc.stderr
    assert not (tmp_path / "x").exists()


def _predict_cmd(env, inp, out, *extra, tr="DiffusionTrainer_2ep3it", check=False):
    return run([f"{BIN}/nnUNetv2_predict_diffusion", "-i", str(inp), "-o", str(out), "-d", "990", "-c",
                "3d_fullres", "-f", "0", "-tr", tr, "-device", "cpu", "-npp", "1", "-nps", "1", *extra],
               env=env, check=check)


def test_nan_in_input_is_refused(env, trained_3d, inputs, tmp_path):
    inp = tmp_path / "nan"
    inp.mkdir()
    img = sitk.ReadImage(str(inputs / "case_003_0000.nii.gz"))
    arr = sitk.GetArrayFromImage(img)
    arr[2, 3, 4] = np.nan
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(img)
    sitk.WriteImage(bad, str(inp / "case_003_0000.nii.gz"))
    proc = _predict_cmd(env, inp, tmp_path / "x")
    assert proc.returncode == 1
    assert "case_003_0000.nii.gz holds 1 NaN/Inf voxel(s)" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_corrupt_checkpoint_is_refused_at_prediction(env, trained_3d, inputs, tmp_path):
    model = os.path.dirname(trained_3d)
    broken = model.replace("DiffusionTrainer_2ep3it", "DiffusionTrainer_3ep3it")
    shutil.rmtree(broken, ignore_errors=True)
    shutil.copytree(model, broken, ignore=shutil.ignore_patterns("validation", "*.png"))
    ck = os.path.join(broken, "fold_0", "checkpoint_final.pth")
    data = open(ck, "rb").read()
    open(ck, "wb").write(data[:1000])
    proc = _predict_cmd(env, inputs, tmp_path / "x", tr="DiffusionTrainer_3ep3it")
    assert proc.returncode == 1
    assert "is corrupt or truncated" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_existing_predictions_kept_with_continue_prediction(env, trained_3d, inputs, tmp_path):
    out = tmp_path / "o"
    sequential = ("-npp", "0", "-nps", "0")  # nnU-Net's sequential mode: no worker processes to start
    _predict_cmd(env, inputs, out, *sequential, check=True)
    target = out / "case_003.nii.gz"
    marker = b"user's file, must survive"
    target.write_bytes(marker)
    _predict_cmd(env, inputs, out, "--continue_prediction", check=True)  # the multi-process path (-npp/-nps 1)
    assert target.read_bytes() == marker  # nnU-Net's --continue_prediction: existing files are not redone
    _predict_cmd(env, inputs, out, *sequential, check=True)  # default (like nnUNetv2_predict): overwrite
    assert target.read_bytes() != marker


def test_uncertainty_maps_include_every_fold(trained, tmp_path):
    """Two folds with different weights, one sample each: each fold alone gives MI = 0 (one sample); the maps over
    both folds give MI > 0 (the folds disagree) and the entropy of the folds' mean probability."""
    model = tmp_path / "model"
    shutil.copytree(os.path.dirname(trained), model,
                    ignore=shutil.ignore_patterns("validation", "*.png"))
    ck = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    torch.manual_seed(0)
    ck["network_weights"] = {k: v + 0.3 * torch.randn_like(v) if v.is_floating_point() else v
                             for k, v in ck["network_weights"].items()}
    (model / "fold_1").mkdir()
    torch.save(ck, model / "fold_1" / "checkpoint_final.pth")
    image = torch.randn(1, 30, 30, 24)

    def maps(folds):
        p = DiffusionPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                               perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                               allow_tqdm=False, num_samples=1, uncertainty=True, tta="off")
        p.initialize_from_trained_model_folder(str(model), folds, "checkpoint_final.pth")
        p.predict_logits_from_preprocessed_data(image)
        return p.uncertainty_maps

    for fold in (0, 1):
        assert maps((fold,))[1].abs().max() < 1e-6  # one sample of one model: no disagreement
    both = maps((0, 1))
    assert both[1].max() > 1e-3
    assert torch.all(both[1] <= both[0] + 1e-5)


def test_raw_weights_are_each_folds_trained_weights(trained, tmp_path):
    """weights="raw" (``--weights raw``): every fold's ``training_network_weights`` replace the checkpoint's
    average, and the prediction is exactly that of a model whose exported weights are those trained weights."""
    model = tmp_path / "model"
    shutil.copytree(os.path.dirname(trained), model,
                    ignore=shutil.ignore_patterns("validation", "*.png"))
    fold0 = model / "fold_0" / "checkpoint_final.pth"
    ck = torch.load(fold0, map_location="cpu", weights_only=False)
    # a trainer with an EMA keeps its trained weights beside the average (the default keeps none since 2026-11-30:
    # its checkpoint gets them here, perturbed below, as that trainer's would)
    trained_weights = ck.get("training_network_weights", ck["network_weights"])
    torch.manual_seed(0)
    raws = []
    for fold in (0, 1):
        # one perturbation per tensor: the network's state dict names some tensors twice (block.conv and
        # all_modules.0), which the trained weights as saved share
        noise = {}
        ck["training_network_weights"] = {
            k: v + noise.setdefault(v.data_ptr(), 0.3 * torch.randn_like(v)) if v.is_floating_point() else v
            for k, v in trained_weights.items()}
        raws.append(ck["training_network_weights"])
        (model / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(ck, model / f"fold_{fold}" / "checkpoint_final.pth")
        # the same model with the trained weights exported: what "raw" must equal
        exported = dict(ck, network_weights=ck["training_network_weights"])
        torch.save(exported, model / f"fold_{fold}" / "checkpoint_exported_raw.pth")
    image = torch.randn(1, 30, 30, 24)

    def predictor(weights, checkpoint="checkpoint_final.pth", folds=(0, 1)):
        p = DiffusionPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                               perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                               allow_tqdm=False, tta="off", weights=weights)
        p.initialize_from_trained_model_folder(str(model), folds, checkpoint)
        return p

    raw = predictor("raw")
    for params, expected in zip(raw.list_of_parameters, raws):
        assert all(torch.equal(params[k], expected[k]) for k in expected)
    assert all(torch.equal(v, raws[0][k]) for k, v in raw.diffusion_network.state_dict().items())
    logits = raw.predict_logits_from_preprocessed_data(image)
    assert torch.allclose(logits, predictor("average", "checkpoint_exported_raw.pth")
                          .predict_logits_from_preprocessed_data(image), atol=1e-5)
    assert not torch.allclose(logits, predictor("average").predict_logits_from_preprocessed_data(image), atol=1e-3)
    with pytest.raises(ValueError, match="weights must be one of"):
        DiffusionPredictor(weights="ema")


def test_raw_weights_refused_without_a_weight_average(env, trained_3d, inputs, tmp_path):
    """``nnUNetv2_predict_diffusion --weights raw`` on a checkpoint that keeps no trained weights beside an average
    (a trainer without EMA, a released model): a clear error, exit code 1, nothing written."""
    ck = torch.load(os.path.join(trained_3d, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    ck.pop("training_network_weights", None)
    torch.save(ck, os.path.join(trained_3d, "checkpoint_no_average_test.pth"))
    out = tmp_path / "o"
    try:
        proc = _predict_cmd(env, inputs, out, "-chk", "checkpoint_no_average_test.pth", "--weights", "raw")
    finally:
        os.remove(os.path.join(trained_3d, "checkpoint_no_average_test.pth"))
    assert proc.returncode == 1
    assert "keeps no separate trained weights" in proc.stderr and "--weights average" in proc.stderr
    assert not out.exists() or not any(out.iterdir())
