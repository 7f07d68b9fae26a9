import math
from dataclasses import replace

import pytest
import torch

from conftest import tiny_diffusion_net
from nnunet_diffusion.config import DiffusionConfig
from nnunet_diffusion.sampling import encode_mask, mask_from_logits
from nnunet_diffusion.schedule import Schedule
from nnunet_diffusion.trainer import DiffusionTrainer, check_diffusion_settings
from nnunet_diffusion.training import make_noisy_mask, sample_levels
from nnunet_diffusion.variants import DiffusionTrainer_noisiestHalf, DiffusionTrainer_zeroInitChainMeanEma


def test_levels_are_uniform_over_the_chain():
    k = sample_levels(50000, 5, torch.device("cpu"), torch.Generator().manual_seed(0))
    counts = torch.bincount(k, minlength=6)
    assert counts[0] == 0 and k.min() == 1 and k.max() == 5
    assert torch.allclose(counts[1:].float() / 50000, torch.full((5,), 0.2), atol=0.01)


def test_without_recycling_xt_is_q_sample_of_ground_truth():
    s = Schedule.resampled(5)
    x0 = encode_mask(torch.randint(0, 3, (4, 1, 5, 5)), 3)
    k = torch.tensor([1, 2, 4, 5])
    called = []
    noisy = make_noisy_mask(lambda *a: called.append(1), torch.zeros(4, 1, 5, 5), x0, s, recycle=False, k=k,
                            generator=torch.Generator().manual_seed(3))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(noisy.xt, s.q_sample(x0, k, eps))
    torch.testing.assert_close(noisy.eps, eps)
    assert noisy.t.tolist() == [0, 250, 750, 1000] and not called


def test_recycling_uses_prediction_at_next_level_with_fresh_noise():
    s = Schedule.resampled(5)
    x0 = encode_mask(torch.randint(0, 3, (3, 1, 4, 4)), 3)
    k = torch.tensor([1, 3, 5])
    fake_pred = torch.randn(3, 3, 4, 4)
    seen = {}

    def net(image, xt, t):
        seen["t"], seen["xt"] = t.tolist(), xt
        return fake_pred

    g = torch.Generator().manual_seed(5)
    noisy = make_noisy_mask(net, torch.zeros(3, 1, 4, 4), x0, s, recycle=True, k=k, generator=g)
    g = torch.Generator().manual_seed(5)
    eps1 = torch.randn(x0.shape, generator=g)
    eps2 = torch.randn(x0.shape, generator=g)
    assert seen["t"] == [250, 750, 1000]          # k' = min(k + 1, K)
    torch.testing.assert_close(seen["xt"], s.q_sample(x0, torch.tensor([2, 4, 5]), eps1))
    torch.testing.assert_close(noisy.xt, s.q_sample(mask_from_logits(fake_pred), k, eps2))
    assert not torch.allclose(eps1, eps2)


def test_unsupervised_recycle_pass_records_no_graph():
    """The paper's recycle pass runs without gradient: the network is called with grad mode off."""
    net = tiny_diffusion_net(3).train()
    s = Schedule.resampled(5)
    image = torch.randn(2, 1, 8, 8, 8)
    x0 = encode_mask(torch.randint(0, 3, (2, 1, 8, 8, 8)), 3)
    grad_modes = []

    def recording(image, xt, t):
        grad_modes.append(torch.is_grad_enabled())
        return net(image, xt, t)

    noisy = make_noisy_mask(recording, image, x0, s, recycle=True, generator=torch.Generator().manual_seed(0))
    assert grad_modes == [False]
    assert not noisy.xt.requires_grad


def test_no_gradient_flows_from_xt_into_the_recycle_pass():
    """Eq. 9's stop-gradient, where it matters: the recycle pass keeps its graph (supervised), yet the supervised
    pass's gradient is exactly that of a detached copy of x_t (nothing flows back through x0_hat')."""
    net = tiny_diffusion_net(3).train()
    torch.nn.init.normal_(net.time_proj.weight, std=0.1)
    s = Schedule.resampled(5)
    image = torch.randn(2, 1, 8, 8, 8)
    x0 = encode_mask(torch.randint(0, 3, (2, 1, 8, 8, 8)), 3)
    noisy = make_noisy_mask(net, image, x0, s, recycle=True, supervise_recycle=True,
                            k=torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0))
    assert noisy.recycled.output.requires_grad
    net(image, noisy.xt, noisy.t).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    # the supervised pass reaches the time path and the first convolution (the mask input)
    assert {"time_proj.weight", "time_mlp.0.weight", "unet.encoder.stages.0.0.convs.0.conv.weight"} <= set(grads)
    net.zero_grad(set_to_none=True)
    net(image, noisy.xt.detach().clone(), noisy.t).square().sum().backward()
    for n, p in net.named_parameters():
        if p.grad is None:
            assert n not in grads
        else:
            torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=0)


def test_noisiest_share_draws_level_k_with_that_probability():
    """``noisiest_share`` p: k = K with probability p, the other levels uniform (and never 0); None stays uniform."""
    g = torch.Generator().manual_seed(0)
    k = sample_levels(50000, 5, torch.device("cpu"), g, noisiest_share=0.5)
    share = torch.bincount(k, minlength=6).float() / 50000
    assert share[0] == 0 and k.min() == 1
    torch.testing.assert_close(share[1:], torch.tensor([0.125, 0.125, 0.125, 0.125, 0.5]), atol=0.01, rtol=0)
    assert sample_levels(1000, 5, torch.device("cpu"), g, noisiest_share=1.0).eq(5).all()
    assert sample_levels(1000, 5, torch.device("cpu"), g, noisiest_share=0.0).max() == 4
    assert sample_levels(10, 1, torch.device("cpu"), g, noisiest_share=0.3).eq(1).all()


def _noisy_batches(make_trainer, name, n, calls=None):
    """``n`` noisy batches that nnU-Net's initialised trainer ``name`` builds from one training batch (seed 0),
    and its K. ``calls``: a list that gets, per batch, the batch size of every network call made to build it."""
    tr = make_trainer(f"{name}_1ep1it")
    batch = next(tr.dataloader_train)
    data = batch["data"].to(tr.device)
    target = [t.to(tr.device) for t in batch["target"]] if isinstance(batch["target"], list) \
        else batch["target"].to(tr.device)
    seen = []
    hook = tr.diffusion_network.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    torch.manual_seed(0)
    batches = []
    try:
        with torch.no_grad():
            for _ in range(n):
                seen.clear()
                batches.append(tr.make_noisy_batch(data, target))
                if calls is not None:
                    calls.append(list(seen))
    finally:
        hook.remove()
    return batches, tr.diffusion_network.training_schedule.num_steps


def test_noisiest_share_is_what_the_trainer_draws(make_trainer):
    """Through nnU-Net's initialised trainer: ``DiffusionTrainer_noisiestHalf`` trains about half of its samples
    at the noisiest level, the default trainer a fifth."""
    def noisiest_fraction(name):
        batches, K = _noisy_batches(make_trainer, name, 50)
        return torch.cat([b.k for b in batches]).eq(K).float().mean().item()

    assert 0.35 < noisiest_fraction("DiffusionTrainer_noisiestHalf") < 0.65
    assert noisiest_fraction("DiffusionTrainer") < 0.3


# the settings the candidates of 2026-11-30 are defined against (the default of 2026-11-29 to 30)
EMA_DEFAULT = DiffusionTrainer_zeroInitChainMeanEma.diffusion


def test_noisiest_share_is_validated_and_refused_across_checkpoints():
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="noisiest_share"):
            DiffusionConfig(noisiest_share=bad)
    ckpt = {"diffusion": DiffusionTrainer_noisiestHalf.diffusion.to_dict(),
            "trainer_name": "DiffusionTrainer_noisiestHalf"}
    with pytest.raises(ValueError, match="noisiest_share"):
        check_diffusion_settings(ckpt, EMA_DEFAULT, "x")
    # a checkpoint written before the field existed drew its levels uniformly
    old = {k: v for k, v in EMA_DEFAULT.to_dict().items() if k != "noisiest_share"}
    check_diffusion_settings({"diffusion": old}, EMA_DEFAULT, "x")
    assert replace(EMA_DEFAULT, noisiest_share=0.5) == DiffusionTrainer_noisiestHalf.diffusion


def test_zero_noisiest_input_zeroes_level_k_in_both_passes():
    """``zero_noisiest_input``: the samples at level K get x_t = 0 in the recycle pass (k' = K) and in the supervised
    pass (k = K); the other samples are exactly what the flag-less recipe builds from the same draws."""
    s = Schedule.resampled(5)
    x0 = encode_mask(torch.randint(0, 3, (3, 1, 4, 4)), 3)
    k = torch.tensor([3, 4, 5])  # recycle levels 4, 5, 5
    pred = torch.randn(3, 3, 4, 4)

    def run(flag):
        seen = {}

        def net(image, xt, t):
            seen["xt"] = xt.clone()
            return pred
        noisy = make_noisy_mask(net, torch.zeros(3, 1, 4, 4), x0, s, recycle=True, k=k, zero_noisiest_input=flag,
                                generator=torch.Generator().manual_seed(7))
        return seen["xt"], noisy.xt

    recycle_in, xt = run(True)
    recycle_ref, xt_ref = run(False)
    assert recycle_in[1:].abs().max() == 0 and recycle_ref[1:].abs().max() > 0  # k' = K for samples 1 and 2
    torch.testing.assert_close(recycle_in[0], recycle_ref[0])
    assert xt[2].abs().max() == 0 and xt_ref[2].abs().max() > 0  # k = K for sample 2
    torch.testing.assert_close(xt[:2], xt_ref[:2])


def test_zero_start_trainer_trains_level_k_on_zeros(make_trainer):
    """Through nnU-Net's initialised trainer: ``DiffusionTrainer_zeroStart`` is the default's settings with the zero
    start at inference and in training, its samples at level K see x_t = 0; the default's do not."""
    from nnunet_diffusion.variants import DiffusionTrainer_zeroInitChainMeanEma, DiffusionTrainer_zeroStart
    assert DiffusionTrainer_zeroStart.diffusion == replace(DiffusionTrainer_zeroInitChainMeanEma.diffusion,
                                                           start="zeros", zero_noisiest_input=True)

    def level_k_inputs(name):
        batches, K = _noisy_batches(make_trainer, name, 6)
        return torch.cat([b.xt[b.k == K].flatten() for b in batches])

    zero, default = level_k_inputs("DiffusionTrainer_zeroStart"), level_k_inputs("DiffusionTrainer")
    assert zero.numel() > 0 and zero.abs().max() == 0
    assert default.numel() > 0 and default.abs().max() > 0


def test_zero_start_settings_refused_only_where_training_differs():
    """``zero_noisiest_input`` changes what training produced: refused across checkpoints; ``start`` only changes
    the chain's output (like ``average_last``): a checkpoint trained with either start loads; a checkpoint written
    before the fields existed had the noise start."""
    from nnunet_diffusion.variants import DiffusionTrainer_zeroStart
    zero = DiffusionTrainer_zeroStart.diffusion
    with pytest.raises(ValueError, match="zero_noisiest_input"):
        check_diffusion_settings({"diffusion": zero.to_dict()}, EMA_DEFAULT, "x")
    check_diffusion_settings({"diffusion": replace(zero, zero_noisiest_input=False).to_dict()},
                             EMA_DEFAULT, "x")
    old = {k: v for k, v in EMA_DEFAULT.to_dict().items() if k not in ("start", "zero_noisiest_input")}
    assert DiffusionConfig.from_dict(old) == EMA_DEFAULT


def _recording_net(net, seen):
    """``net`` (a tiny DiffusionUNet) as a denoise function that records every call's (t, x_t)."""
    def call(image, xt, t):
        seen.append((t.tolist(), xt.clone()))
        return net(image, xt, t)
    return call


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_chain_recycle_input_is_the_sampling_chains_own(sampler):
    """``recycle_source="chain"``: a sample at level k is trained on the x_k that the sampling chain
    (``p_sample_loop``, same network, same generator) feeds the network at that level, not on a noised estimate."""
    from nnunet_diffusion.sampling import p_sample_loop
    net = tiny_diffusion_net(2).eval()
    s = Schedule.resampled(5)
    image = torch.randn(2, 1, 8, 8)
    x0 = encode_mask(torch.randint(0, 3, (2, 1, 8, 8)), 3)
    chain_seen = []
    p_sample_loop(_recording_net(net, chain_seen), image, s, 3, sampler=sampler,
                  generator=torch.Generator().manual_seed(4))
    for level in (5, 3, 1):
        train_seen = []
        noisy = make_noisy_mask(_recording_net(net, train_seen), image, x0, s, recycle=True,
                                recycle_source="chain", sampler=sampler, k=torch.tensor([level, level]),
                                generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(noisy.xt, chain_seen[5 - level][1])
        assert [t for t, _ in train_seen] == [t for t, _ in chain_seen[:5 - level]]  # one call per level above k
        assert noisy.t.tolist() == chain_seen[5 - level][0]
        abar = s.extract("alpha_bar", noisy.k, 4)
        torch.testing.assert_close(noisy.xt, abar.sqrt() * x0 + (1 - abar).sqrt() * noisy.eps)


def test_chain_recycle_evaluates_only_the_samples_still_descending():
    """Mixed levels: each step calls the network on the samples above their level only; a level-K sample keeps
    the starting draw (zeros with ``zero_noisiest_input``), and no call records a gradient."""
    net = tiny_diffusion_net(2).train()
    s = Schedule.resampled(5)
    image = torch.randn(3, 1, 8, 8)
    x0 = encode_mask(torch.randint(0, 3, (3, 1, 8, 8)), 3)
    k = torch.tensor([5, 2, 4])
    seen, grads = [], []

    def net_fn(im, xt, t):
        grads.append(torch.is_grad_enabled())
        seen.append((t.tolist(), xt.shape[0]))
        return net(im, xt, t)

    noisy = make_noisy_mask(net_fn, image, x0, s, recycle=True, recycle_source="chain", k=k,
                            generator=torch.Generator().manual_seed(1))
    assert seen == [([1000, 1000], 2), ([750], 1), ([500], 1)] and not any(grads)
    start = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(noisy.xt[0], start[0])
    assert not torch.allclose(noisy.xt[1:], start[1:])
    zero = make_noisy_mask(net_fn, image, x0, s, recycle=True, recycle_source="chain", k=k, zero_noisiest_input=True,
                           generator=torch.Generator().manual_seed(1))
    assert zero.xt[0].abs().max() == 0


def test_chain_recycle_settings_validated_and_refused_across_checkpoints(make_trainer):
    """The field is validated, recorded and refused across checkpoints; ``DiffusionTrainer_chainRecycle`` is the
    default's settings with it, and through nnU-Net's initialised trainer its level-1 inputs come from the chain
    (several network calls per batch), the default's from one recycle pass."""
    from nnunet_diffusion.variants import DiffusionTrainer_chainRecycle, DiffusionTrainer_zeroInitChainMeanEma
    for bad in ({"supervise_recycle": True}, {"self_condition": True}):
        with pytest.raises(ValueError, match="chain"):
            DiffusionConfig(recycle_source="chain", **bad)
    chain = DiffusionTrainer_chainRecycle.diffusion
    assert chain == replace(DiffusionTrainer_zeroInitChainMeanEma.diffusion, recycle_source="chain")
    with pytest.raises(ValueError, match="recycle_source"):
        check_diffusion_settings({"diffusion": chain.to_dict()}, DiffusionTrainer.diffusion, "x")

    def calls_and_levels(name, n):
        calls = []
        batches, K = _noisy_batches(make_trainer, name, n, calls)
        return [(c, b.k.tolist()) for c, b in zip(calls, batches)], K

    batches, K = calls_and_levels("DiffusionTrainer_chainRecycle", 8)
    for calls, k in batches:  # one call per level above the lowest, on the samples above their own level
        assert calls == [sum(1 for ki in k if ki < level) for level in range(K, min(k), -1)]
    assert any(len(calls) > 1 for calls, _ in batches)
    default, _ = calls_and_levels("DiffusionTrainer", 2)
    assert all(len(calls) == 1 for calls, _ in default)


def test_image_only_control_never_sees_a_mask(make_trainer):
    """``DiffusionTrainer_imageOnly``: through nnU-Net's initialised trainer every training input x_t is zeros at the
    one level t = 1000 (no recycle call), and its chain is one network call on zeros."""
    from nnunet_diffusion.variants import DiffusionTrainer_imageOnly, DiffusionTrainer_imageOnlyNoEma
    assert DiffusionTrainer_imageOnlyNoEma.diffusion == replace(DiffusionTrainer_imageOnly.diffusion, ema_halflife=0)
    assert DiffusionTrainer_imageOnly.diffusion.ema_halflife > 0
    batches, K = _noisy_batches(make_trainer, "DiffusionTrainer_imageOnly", 3)
    assert K == 1
    for b in batches:
        assert b.xt.abs().max() == 0 and b.t.eq(1000).all() and b.recycled is None
    net = tiny_diffusion_net(3, config=DiffusionTrainer_imageOnly.diffusion).eval()
    seen, step = [], net.denoise
    net.denoise = lambda image, xt, t: seen.append((xt.clone(), t.tolist())) or step(image, xt, t)
    with torch.no_grad():
        net(torch.randn(1, 1, 8, 8, 8))
    assert len(seen) == 1 and seen[0][0].abs().max() == 0 and seen[0][1] == [1000]


def test_image_only_control_without_time_trains_the_stock_parameters(make_trainer):
    """``DiffusionTrainer_imageOnlyNoTime`` through nnU-Net's initialised trainers: the optimiser trains exactly the
    parameters stock nnUNetTrainer trains (same names and shapes), except the input convolution's C extra mask
    channels, which start at zero and, with a zero input, get no gradient; the control with the time path has more."""
    def params(name):
        tr = make_trainer(name)
        named = dict(tr.network.named_parameters())
        in_optimizer = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
        assert in_optimizer == {id(p) for p in named.values()}
        return {k.removeprefix("unet."): tuple(p.shape) for k, p in named.items()}, tr

    stock, _ = params("nnUNetTrainer_1ep1it")
    untimed, tr = params("DiffusionTrainer_imageOnlyNoTime_1ep1it")
    timed, _ = params("DiffusionTrainer_imageOnly_1ep1it")
    first = next(k for k in stock if k.endswith("conv.weight"))
    assert untimed.keys() == stock.keys()
    assert {k: v for k, v in untimed.items() if k != first} == {k: v for k, v in stock.items() if k != first}
    c = tr.label_manager.num_segmentation_heads
    assert untimed[first] == (stock[first][0], stock[first][1] + c, *stock[first][2:])
    assert set(timed) - set(untimed) and all(k.startswith(("time_", "encoder", "decoder")) for k in set(timed) - set(untimed))


def test_stock_image_init_starts_the_image_weights_as_stock_does(make_trainer):
    """``stock_image_init`` through nnU-Net's initialised trainers: the input convolution's image weights of
    ``DiffusionTrainer_stockImageInit`` (and of the control ``DiffusionTrainer_imageOnlyNoTimeStockInit``) are
    drawn at stock nnUNetTrainer's scale; the default's are drawn for 1 + C inputs, sqrt(1 / (1 + C)) of it. With
    the same seed the two diffusion trainers' image weights differ by exactly that factor; the mask weights stay
    zero."""
    def first_conv(name):
        torch.manual_seed(123)
        net = make_trainer(name).network
        net = getattr(net, "unet", net)
        return next(m for m in net.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)).weight.detach()

    stock = first_conv("nnUNetTrainer_1ep1it")
    default = first_conv("DiffusionTrainer_1ep1it")
    candidate = first_conv("DiffusionTrainer_stockImageInit_1ep1it")
    control = first_conv("DiffusionTrainer_imageOnlyNoTimeStockInit_1ep1it")
    c = default.shape[1] - stock.shape[1]
    assert stock.shape[1] == 1 and c == 3 and stock.numel() >= 500  # enough weights for the scale checks below
    torch.testing.assert_close(candidate[:, :1], default[:, :1] * math.sqrt(1 + c))
    assert candidate[:, 1:].abs().max() == 0 and control[:, 1:].abs().max() == 0
    for weights, ratio in ((candidate, 1.0), (control, 1.0), (default, math.sqrt(1 / (1 + c)))):
        assert abs(weights[:, :1].std() / stock.std() - ratio) < 0.12 * ratio
