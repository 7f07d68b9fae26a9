"""The diffusion training step under DistributedDataParallel (gloo, 2 CPU processes).

The step is the one DiffusionTrainer runs: recycle pass through the DDP wrapper with the deep-supervision
heads switched off, supervised pass with them on, nnU-Net's deep-supervised Dice + CE (ddp=True), backward,
SGD step. Both ranks see different data; after the steps their parameters must be identical.
"""
import os
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from conftest import tiny_diffusion_net
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from torch.nn.parallel import DistributedDataParallel as DDP

    from nnunet_diffusion.sampling import encode_mask
    from nnunet_diffusion.training import full_resolution_pass, make_noisy_mask

    net = tiny_diffusion_net(3, deep_supervision=True)  # same seed on both ranks
    torch.nn.init.normal_(net.time_proj.weight, std=0.05)
    ddp = DDP(net)
    loss_fn = DeepSupervisionWrapper(
        DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": True}, {},
                       weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss), [0.57, 0.29, 0.14])
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(100 + rank)  # different data and noise per rank
    for _ in range(3):
        image = torch.randn(2, 1, 8, 8, 8, generator=g)
        label = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=g).float()
        targets = [label, label[:, :, ::2, ::2, ::2], label[:, :, ::4, ::4, ::4]]
        x0 = encode_mask(label, 3)
        noisy = make_noisy_mask(full_resolution_pass(ddp, net.decoder), image, x0, net.training_schedule,
                                recycle=True, generator=g)
        assert net.decoder.deep_supervision  # restored after the recycle pass
        out = ddp(image, noisy.xt, noisy.t)
        loss = loss_fn(out, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    flat = torch.cat([p.detach().flatten() for p in net.parameters()]).numpy()
    np.save(os.path.join(out_dir, f"rank{rank}.npy"), flat)
    dist.destroy_process_group()


def test_ddp_ranks_stay_identical(tmp_path):
    init = tmp_path / "init"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, 2, str(init), str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
        assert p.exitcode == 0, f"rank exited with {p.exitcode}"
    a, b = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    assert np.array_equal(a, b)
    # and training moved the parameters (the ranks did not just both stay at the initial values)
    from conftest import tiny_diffusion_net
    net = tiny_diffusion_net(3, deep_supervision=True)
    torch.nn.init.normal_(net.time_proj.weight, std=0.05)
    init_params = torch.cat([p.detach().flatten() for p in net.parameters()]).numpy()
    assert not np.allclose(a, init_params)
