"""Where the time of a DiffusionTrainer iteration goes, next to a stock nnUNetTrainer iteration.

    python benchmarks/profile_train_step.py -d 4 -c 3d_fullres [--repeats 5] [-device cpu]

Needs the dataset planned and preprocessed (nnUNet_preprocessed). Prints medians (s) of: the stock
train_step, the diffusion train_step, and inside the latter the recycle pass alone (no gradient, no
deep-supervision heads) and the noise/one-hot preparation; the "floor" is stock + recycle pass.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("-d", required=True)
    ap.add_argument("-c", default="3d_fullres")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("-device", default="cpu")
    args = ap.parse_args(argv)
    os.environ["nnUNet_results"] = tempfile.mkdtemp()
    from nnunet_diffusion.benchmark import _make_trainer, _sync
    from nnunet_diffusion.sampling import encode_mask, full_resolution
    from nnunet_diffusion.training import full_resolution_pass
    dev = torch.device(args.device)
    stock = _make_trainer("nnUNetTrainer", args.d, args.c, dev)
    diff = _make_trainer("DiffusionTrainer", args.d, args.c, dev)
    times = {k: [] for k in ("stock step", "diffusion step", "recycle pass", "one-hot + noise")}

    def timed(key, fn):
        _sync(dev)
        t0 = time.perf_counter()
        out = fn()
        _sync(dev)
        times[key].append(time.perf_counter() - t0)
        return out

    for i in range(args.repeats + 1):
        batch = next(stock.dataloader_train)
        timed("stock step", lambda: stock.train_step(batch))
        timed("diffusion step", lambda: diff.train_step(batch))
        data = batch["data"].to(dev)
        target = full_resolution(batch["target"]).to(dev)
        x0 = timed("one-hot + noise", lambda: (encode_mask(target, 3), torch.randn((2,) + tuple(target.shape[:1])
                                                                                 + (3,) + tuple(target.shape[2:]))))[0]
        sched = diff.diffusion_network.training_schedule
        k = torch.full((data.shape[0],), 3, device=dev)
        xt = sched.q_sample(x0, k, torch.randn_like(x0))
        recycle = full_resolution_pass(diff.network, diff.diffusion_network.decoder)
        with torch.no_grad():
            timed("recycle pass", lambda: recycle(data, xt, sched.timesteps_of(k)))
        if i == 0:
            for v in times.values():
                v.clear()
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:18s} {v:.3f} s")
    floor = (med["stock step"] + med["recycle pass"]) / med["stock step"]
    print(f"ratio diffusion/stock {med['diffusion step'] / med['stock step']:.3f}; floor (stock + recycle pass) "
          f"/ stock {floor:.3f}; the rest (time path, FiLM, noise, one-hot): "
          f"{med['diffusion step'] - med['stock step'] - med['recycle pass']:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
