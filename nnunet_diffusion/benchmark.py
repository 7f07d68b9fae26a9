"""``nnunet-diffusion benchmark``: DiffusionTrainer vs stock nnUNetTrainer, side by side, one process tree.

Both trainers are built on the same plans, batch size and data; timed steps alternate (A B A B) on the
*same* batches so that machine drift cancels. Reported as medians and as ratios diffusion / stock:

* ``train_iter_s``: one training iteration (host-to-device copy, forward incl. the recycle pass, loss,
  backward, optimiser step); data loading is timed separately (``data_load_s``).
* ``peak_mem``: CUDA max allocated during an iteration (GPU) or the peak RSS growth over the
  iteration (CPU, sampled every millisecond, after returning freed heap pages to the OS), in MiB.
* ``predict_case_s``: one preprocessed case through the sliding-window predictor: stock with nnU-Net's
  default mirroring; diffusion with each TTA mode (chain, full, off).
* ``dice``: foreground-mean Dice on the fold-0 validation cases after the same training budget for both
  (nnUNetv2_train with ``<Trainer>_<E>ep<I>it``; skipped with ``--quick``).

Everything is written under ``-o DIR``; nnU-Net results of the benchmark go to ``DIR/nnUNet_results``,
so the user's own results are never touched.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from nnunet_diffusion.config import DiffusionConfig


class PeakRSS:
    """Peak resident-set-size growth (MiB) over a block, sampled from /proc every millisecond."""

    def __init__(self):
        self.peak = 0.0

    @staticmethod
    def _rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20

    def __enter__(self):
        self.base = self._rss()
        self.peak = self.base
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, self._rss())
                time.sleep(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def growth(self) -> float:
        return self.peak - self.base


def _release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc), so RSS growth over the next iteration measures what the
    iteration needs rather than what the allocator happened to keep from the previous one."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_step(trainer, batch, device) -> Dict[str, float]:
    """Time and peak memory of one train_step."""
    trainer.network.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        _sync(device)
        t0 = time.perf_counter()
        trainer.train_step(batch)
        _sync(device)
        dt = time.perf_counter() - t0
        mem = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    else:
        _release_free_memory()
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            trainer.train_step(batch)
            dt = time.perf_counter() - t0
        mem = rss.growth
    return {"time": dt, "mem": mem}


def _median(values: List[float]) -> float:
    return float(statistics.median(values))


def _make_trainer(name: str, dataset: str, config: str, device: torch.device, plans: str = "nnUNetPlans"):
    from nnunetv2.run.run_training import get_trainer_from_args
    tr = get_trainer_from_args(dataset, config, 0, name, plans_identifier=plans, device=device)
    tr.initialize()
    tr.dataloader_train, tr.dataloader_val = tr.get_dataloaders()
    return tr


DIFFUSION_MODES = ("full", "final", "chain", "off")


def _time_prediction(trainer, predictor, data: torch.Tensor) -> float:
    _sync(trainer.device)
    t0 = time.perf_counter()
    predictor.predict_sliding_window_return_logits(data)
    _sync(trainer.device)
    return time.perf_counter() - t0


def run_benchmark(dataset: str, config: str, out_dir: str, device: str = "cpu", quick: bool = False,
                  budget: Optional[tuple] = None, repeats: Optional[int] = None,
                  predict_cases: Optional[int] = None, log: Callable[[str], None] = print,
                  plans: str = "nnUNetPlans", trainer: str = "DiffusionTrainer") -> Dict:
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_diffusion.options import trainers_path
    from nnunet_diffusion.machine import machine_info
    from nnunet_diffusion.predictor import DiffusionPredictor

    dataset_name = maybe_convert_to_dataset_name(dataset)
    if not nnUNet_preprocessed.is_set() or not os.path.isfile(
            os.path.join(str(nnUNet_preprocessed), dataset_name, f"{plans}.json")):
        raise ValueError(f"{dataset_name} has no plans {plans!r} ({plans}.json): run nnUNetv2_plan_and_preprocess "
                         f"-d {dataset} -c {config} first (with nnUNet_preprocessed set; for other plans, its -pl "
                         f"and -overwrite_plans_name)")
    os.makedirs(out_dir, exist_ok=True)
    os.environ["nnUNet_results"] = os.path.join(os.path.abspath(out_dir), "nnUNet_results")
    os.environ.setdefault("nnUNet_extTrainer", trainers_path())
    os.environ.setdefault("nnUNet_compile", "f")
    dev = torch.device(device)
    repeats = repeats or (3 if quick else 10)
    predict_cases = predict_cases or (2 if quick else 5)

    log(f"benchmark: {dataset_name} {config} on {dev}, {repeats} timed iterations per trainer (interleaved)")
    trainers = {"stock": _make_trainer("nnUNetTrainer", dataset, config, dev, plans),
                "diffusion": _make_trainer(trainer, dataset, config, dev, plans)}
    batch_size = trainers["stock"].batch_size
    assert trainers["diffusion"].batch_size == batch_size

    # the same batches for both; data loading timed on its own
    batches, load_times = [], []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        batches.append(next(trainers["stock"].dataloader_train))
        load_times.append(time.perf_counter() - t0)

    results: Dict[str, Dict[str, List[float]]] = {k: {"time": [], "mem": []} for k in trainers}
    for i, batch in enumerate(batches):
        for name, tr in trainers.items():  # A B A B ...
            r = _timed_step(tr, batch, dev)
            if i == 0:
                continue  # warm-up
            results[name]["time"].append(r["time"])
            results[name]["mem"].append(r["mem"])
            log(f"  iteration {i}/{repeats} {name:9s} {r['time']:.3f} s, peak +{r['mem']:.0f} MiB")

    # prediction: preprocessed validation cases, interleaved per case
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    tr_s = trainers["stock"]
    _, val_keys = tr_s.do_split()
    ds = infer_dataset_class(tr_s.preprocessed_dataset_folder)(tr_s.preprocessed_dataset_folder,
                                                               val_keys[:predict_cases])
    cases = [torch.from_numpy(np.asarray(ds.load_case(k)[0][:])).float() for k in ds.identifiers]

    def attach(p, tr):
        tr.set_deep_supervision_enabled(False)
        p.manual_initialization(tr.network, tr.plans_manager, tr.configuration_manager, None, tr.dataset_json,
                                type(tr).__name__, tr.inference_allowed_mirroring_axes)
        return p

    common = dict(tile_step_size=0.5, use_gaussian=True, perform_everything_on_device=dev.type == "cuda",
                  device=dev, verbose=False, allow_tqdm=False)

    def stock_predictor(mirroring):
        return lambda tr: attach(nnUNetPredictor(use_mirroring=mirroring, **common), tr)

    def diffusion_predictor(tta):
        return lambda tr: attach(DiffusionPredictor(use_mirroring=tta != "off", tta=tta, **common), tr)

    # a trunk + head model predicts through stock's predictor (nnU-Net mirrors the whole prediction): "mirror" with
    # nnU-Net's default mirroring, "off" without; a DiffusionUNet through DiffusionPredictor's TTA modes
    head = not hasattr(trainers["diffusion"], "diffusion")
    modes = ("mirror", "off") if head else DIFFUSION_MODES
    makers = {"stock": (trainers["stock"], stock_predictor(True)),
              "stock_notta": (trainers["stock"], stock_predictor(False)),
              **{m: (trainers["diffusion"], stock_predictor(m == "mirror") if head else diffusion_predictor(m))
                 for m in modes}}
    predictors = {name: make(tr) for name, (tr, make) in makers.items()}
    for name, p in predictors.items():  # warm-up: first calls pay for allocation and kernel selection
        p.predict_sliding_window_return_logits(cases[0])
    predict: Dict[str, List[float]] = {name: [] for name in makers}
    order = list(makers)
    for c, data in enumerate(cases):
        # ABBA: the order reverses every case so that drift of the machine cancels
        for name in (order if c % 2 == 0 else order[::-1]):
            t = _time_prediction(makers[name][0], predictors[name], data)
            predict[name].append(t)
            log(f"  predict case {c + 1}/{len(cases)} {name:11s} {t:.2f} s")

    med = {
        "train_iter_s": {k: _median(v["time"]) for k, v in results.items()},
        "peak_mem_mib": {k: _median(v["mem"]) for k, v in results.items()},
        "predict_case_s": {k: _median(v) for k, v in predict.items()},
    }
    report = {
        "dataset": dataset_name, "configuration": config, "device": str(dev), "batch_size": batch_size,
        "patch_size": list(trainers["stock"].configuration_manager.patch_size),
        "repeats": repeats, "predict_cases": len(cases), "quick": quick,
        # the default changes between releases: the settings that were timed
        "diffusion_trainer": type(trainers["diffusion"]).__name__,
        "diffusion_config": (asdict(trainers["diffusion"].head) if head else
                             trainers["diffusion"].diffusion.to_dict()),
        "predict_modes": list(modes),
        "machine": dict(machine_info(device), torch_threads=torch.get_num_threads()),
        "torch_version": torch.__version__,
        "medians": med,
        "data_load_s": _median(load_times[1:]) if len(load_times) > 1 else load_times[0],
        "raw": {"train_iter_s": {k: v["time"] for k, v in results.items()},
                "peak_mem_mib": {k: v["mem"] for k, v in results.items()}, "predict_case_s": predict},
        "train_iter_ratio": med["train_iter_s"]["diffusion"] / med["train_iter_s"]["stock"],
        "peak_mem_ratio": (med["peak_mem_mib"]["diffusion"] / med["peak_mem_mib"]["stock"]
                           if med["peak_mem_mib"]["stock"] > 0 else None),
        # ratios of each diffusion TTA mode's time per case to stock nnU-Net with its default mirroring
        # ("predict_ratio") and to stock without mirroring ("predict_ratio_notta")
        "predict_ratio": {m: med["predict_case_s"][m] / med["predict_case_s"]["stock"] for m in modes},
        "predict_ratio_notta": {m: med["predict_case_s"][m] / med["predict_case_s"]["stock_notta"] for m in modes},
        "dice_diffusion": None, "dice_stock": None,
    }
    del trainers

    if not quick:
        epochs, iters = budget or (5, 50)
        report["budget"] = f"{epochs}x{iters}"
        dice = {}
        for key, base in (("stock", "nnUNetTrainer"), ("diffusion", trainer)):
            name = f"{base}_{epochs}ep{iters}it"
            log(f"training {name} for the Dice comparison (fold 0)")
            env = dict(os.environ, nnUNet_n_proc_DA=os.environ.get("nnUNet_n_proc_DA", "0"))
            subprocess.run([os.path.join(os.path.dirname(sys.executable), "nnUNetv2_train"), dataset, config, "0",
                            "-tr", name, "-p", plans, "-device", device], env=env, check=True)
            summary = load_json(os.path.join(os.environ["nnUNet_results"], dataset_name,
                                             f"{name}__{plans}__{config}", "fold_0", "validation",
                                             "summary.json"))
            dice[key] = float(summary["foreground_mean"]["Dice"])
        report["dice_stock"], report["dice_diffusion"] = dice["stock"], dice["diffusion"]

    with open(os.path.join(out_dir, "benchmark.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, "benchmark.md"), "w") as f:
        f.write(format_markdown(report))
    return report


_PAPER = DiffusionConfig().to_dict()  # the paper's configuration (DiffusionTrainer_paper)


def format_markdown(r: Dict) -> str:
    m = r["medians"]
    mach = r["machine"]
    where = mach["gpu"] or f"CPU ({mach['cpu']}, {mach['cpu_count']} cores, {mach['torch_threads']} torch threads)"
    lines = [f"# {r['diffusion_trainer']} vs nnUNetTrainer — {r['dataset']} {r['configuration']}", "",
             f"Device: {where}; torch {r['torch_version']}, nnunetv2 {mach['nnunetv2']}, {mach['date_utc']} UTC; batch {r['batch_size']}, patch {r['patch_size']}; "
             f"medians over {r['repeats']} interleaved iterations and {r['predict_cases']} case(s).", ""]
    if r.get("diffusion_config") and "predict_modes" in r and "mirror" in r["predict_modes"]:
        lines += [f"Settings: {r['diffusion_config']}.", ""]
    elif r.get("diffusion_config"):
        changed = {k: v for k, v in r["diffusion_config"].items() if k in _PAPER and v != _PAPER[k]}
        lines += [f"DiffusionTrainer: `{r['diffusion_trainer']}`, its settings that differ from the paper's "
                  f"configuration: {', '.join(f'{k} = {v}' for k, v in changed.items()) or 'none'}.", ""]
    lines += [f"| quantity | nnUNetTrainer | {r['diffusion_trainer']} | ratio |", "|---|---|---|---|",
              f"| train iteration (s) | {m['train_iter_s']['stock']:.3f} | {m['train_iter_s']['diffusion']:.3f} | "
              f"{r['train_iter_ratio']:.2f} |"]
    pm = r["peak_mem_ratio"]
    lines.append(f"| peak memory of an iteration (MiB) | {m['peak_mem_mib']['stock']:.0f} | "
                 f"{m['peak_mem_mib']['diffusion']:.0f} | {'–' if pm is None else f'{pm:.2f}'} |")
    if r.get("dice_stock") is not None:
        lines.append(f"| foreground Dice after {r['budget']} (fold 0 validation) | {r['dice_stock']:.3f} | "
                     f"{r['dice_diffusion']:.3f} | – |")
    lines += ["", "Prediction, seconds per case (warmed-up predictors, ABBA order), each mode against "
                  f"stock nnU-Net with its default mirroring ({m['predict_case_s']['stock']:.2f} s) and without "
                  f"({m['predict_case_s']['stock_notta']:.2f} s):", "",
              "| mode (`--tta`, or nnU-Net's mirroring) | s / case | ratio to stock with mirroring | "
              "ratio to stock without |", "|---|---|---|---|"]
    for mode in r.get("predict_modes", DIFFUSION_MODES):
        lines.append(f"| {mode} | {m['predict_case_s'][mode]:.2f} | {r['predict_ratio'][mode]:.2f} | "
                     f"{r['predict_ratio_notta'][mode]:.2f} |")
    lines += ["", f"Data loading per batch (not in the iteration time): {r['data_load_s']:.3f} s.", ""]
    return "\n".join(lines)
