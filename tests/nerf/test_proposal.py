"""The proposal renderer (issue 28, mip-NeRF 360 / nerfacto): spacing, edge resampling, the interlevel and
distortion losses, which parts each loss trains, learning on the tiny scene, and the fox experiment."""
import pytest
import torch

from common.task_data import TaskData
from lightning_modules.nerf import NerfModule
from lightning_modules.nerf.proposal import (
    distortion_loss,
    from_spacing,
    interlevel_loss,
    resample_edges,
    to_spacing,
    uniform_edges,
)
from suite.train import run
from tests.conftest import SHARED_DATA
from tests.nerf.test_hashgrid import HASH, HASH_CLI
from tests.nerf.test_train import TINY, _ray_batch, tiny_scene, train_on_tiny_scene

UNBOUNDED = {**HASH, "contraction": "l2"}
SMALL_PROPOSALS = {"proposal_samples": [16, 8], "num_samples": 8, "proposal_anneal_steps": 0,
                   "proposal_net": {"levels": 2, "log2_table_size": 8, "base_resolution": 4,
                                    "finest_resolution": [8, 16]}}
SMALL_PROPOSALS_CLI = ["model.renderer=proposal", "model.proposal_samples=[16,8]", "model.num_samples=8",
                       "model.proposal_net.levels=2", "model.proposal_net.log2_table_size=8",
                       "model.proposal_net.base_resolution=4",
                       "model.proposal_net.finest_resolution=[8,16]"]
FOX = SHARED_DATA / "nerf" / "fox"


def _proposal_module(**kwargs):
    torch.manual_seed(0)
    return NerfModule(net={**UNBOUNDED, **kwargs.pop("net", {})}, renderer="proposal", **{**SMALL_PROPOSALS, **kwargs})


def test_the_spacing_maps_near_to_0_and_far_to_1_monotonically_and_puts_few_samples_far_away():
    near, far, pivot = torch.tensor([[0.5], [2.0]]), torch.tensor([[1000.0], [6.0]]), torch.tensor(6.0)
    depths = near + (far - near) * torch.linspace(0, 1, 2001)
    s = to_spacing(depths, near, far, pivot)
    assert torch.allclose(s[:, 0], torch.zeros(2), atol=1e-6) and torch.allclose(s[:, -1], torch.ones(2), atol=1e-6)
    assert (s.diff(dim=-1) > 0).all()
    assert torch.allclose(from_spacing(s, near, far, pivot), depths, rtol=1e-4)
    uniform = from_spacing(torch.linspace(0, 1, 1001).expand(2, -1), near, far, pivot)
    assert (uniform[0] > 100.0).float().mean() < 0.05  # depth 100-1000 is 90% of the range but disparity-spaced
    assert (uniform[0] < 6.0).float().mean() > 0.4  # linear up to the pivot: the foreground keeps its samples


@pytest.mark.parametrize("perturb", [False, True])
def test_resampled_intervals_are_sorted_contiguous_and_land_in_the_heavy_bin(perturb):
    torch.manual_seed(0)
    edges = uniform_edges(5, 10, perturb, torch.device("cpu"))
    assert torch.equal(edges[:, 0], torch.zeros(5)) and torch.equal(edges[:, -1], torch.ones(5))
    weights = torch.zeros(5, 10)
    weights[:, 3] = 1.0  # all the light stops in [0.3, 0.4] (perturbed: the ray's own 4th interval)
    new = resample_edges(edges, weights, 64, perturb)
    assert new.shape == (5, 65) and (new.diff(dim=-1) >= 0).all() and (new >= 0).all() and (new <= 1).all()
    inside = (new >= edges[:, 3:4]) & (new <= edges[:, 4:5])
    assert inside.float().mean(-1).min() > 0.85  # the padding leaves the 9 empty bins 1% each


def test_equal_weights_resample_to_the_cdfs_midpoints():
    edges = torch.linspace(0, 1, 11)[None]
    new = resample_edges(edges, torch.ones(1, 10), 4, perturb=False)
    assert torch.allclose(new, torch.tensor([[0.1, 0.3, 0.5, 0.7, 0.9]]), atol=1e-6)  # quantiles (k + 0.5) / 5


def test_the_interlevel_loss_is_zero_when_the_proposal_bounds_the_weights_and_positive_where_it_does_not():
    torch.manual_seed(0)
    edges = torch.sort(torch.rand(4, 9), -1).values
    weights = torch.rand(4, 8) / 8
    # zero up to the rounding of the cumulative sums the bound is read from
    assert interlevel_loss(edges, weights, [edges], [weights]) < 1e-10
    coarse_edges, coarse_weights = edges[:, ::2], weights.reshape(4, 4, 2).sum(-1)  # each bin holds two fine ones
    assert interlevel_loss(edges, weights, [coarse_edges], [coarse_weights]) < 1e-10
    elsewhere = torch.zeros_like(weights)
    elsewhere[:, 0] = 1.0  # all proposal mass in the first interval, the final weights everywhere
    wrong = interlevel_loss(edges, weights, [edges], [elsewhere])
    assert wrong > 1e-3
    assert torch.allclose(interlevel_loss(edges, weights, [edges, edges], [weights, elsewhere]), wrong)  # per round


def _distortion_by_double_sum(edges, weights):
    mids, widths = 0.5 * (edges[:, 1:] + edges[:, :-1]), edges[:, 1:] - edges[:, :-1]
    pairs = (weights[:, :, None] * weights[:, None, :] * (mids[:, :, None] - mids[:, None, :]).abs()).sum((1, 2))
    return (pairs + (weights**2 * widths).sum(-1) / 3).mean()


def test_the_distortion_loss_is_the_double_sum_and_prefers_compact_weights():
    torch.manual_seed(0)
    edges = torch.sort(torch.rand(6, 33), -1).values
    weights = torch.rand(6, 32) / 16
    assert torch.allclose(distortion_loss(edges, weights), _distortion_by_double_sum(edges, weights), rtol=1e-5)
    edges = torch.linspace(0, 1, 33)[None]
    compact, spread = torch.zeros(1, 32), torch.full((1, 32), 1 / 32)
    compact[0, 15:17] = 0.5
    assert distortion_loss(edges, compact) < distortion_loss(edges, spread) / 5


def _grads(module, loss):
    module.zero_grad()
    loss.backward(retain_graph=True)
    proposal = [p.grad for p in module.proposal.parameters()]
    field = [p.grad for p in module.coarse.parameters()]
    touched = lambda grads: any(g is not None and g.abs().sum() > 0 for g in grads)  # noqa: E731
    return touched(proposal), touched(field)


def test_the_interlevel_loss_trains_the_proposal_networks_and_the_distortion_loss_the_field():
    module = _proposal_module()
    with torch.no_grad():  # a proposal whose histogram is far from the field's weights: a large interlevel loss
        module.proposal.networks[0].density_net[-1].bias.fill_(-5.0)
        module.proposal.networks[1].density_net[-1].bias.fill_(-5.0)
    out = module.render_rays(_ray_batch(16), perturb=True)
    interlevel = interlevel_loss(out["spacing_edges"], out["weights"], out["proposal_edges"], out["proposal_weights"])
    distortion = distortion_loss(out["spacing_edges"], out["weights"])
    assert interlevel > 0 and distortion > 0
    assert _grads(module, interlevel) == (True, False)
    assert _grads(module, distortion) == (False, True)
    assert _grads(module, (out["rgb"] - 0.5).square().mean()) == (False, True)  # the photometric loss: field only


def test_a_training_step_adds_both_losses_with_their_multipliers():
    module = _proposal_module(interlevel_loss_mult=0.0, distortion_loss_mult=0.0)
    torch.manual_seed(1)
    plain = module.training_step(_ray_batch(16), 0)
    module.proposal.interlevel_loss_mult, module.proposal.distortion_loss_mult = 1.0, 0.002
    torch.manual_seed(1)
    out = module.render_rays(_ray_batch(16), perturb=True)
    total, logged = module.proposal.losses(out)
    torch.manual_seed(1)
    assert torch.allclose(module.training_step(_ray_batch(16), 0), plain + total)
    assert total > 0 and set(logged) == {"train/interlevel", "train/distortion"}


def test_the_proposal_renderer_refuses_a_field_that_does_not_contract_space():
    with pytest.raises(ValueError, match=r"model.renderer=proposal.*model.net.contraction=l2.*got none"):
        NerfModule(net=HASH, renderer="proposal")
    with pytest.raises(ValueError, match=r"nerf_net=hashgrid with model.net.contraction"):
        NerfModule(**TINY, renderer="proposal")  # the MLP field reads raw positions: no contraction at all
    with pytest.raises(ValueError, match=r"model.net.contraction=l2: scene contraction is a hash-grid setting"):
        NerfModule(net={"_target_": "lightning_modules.nerf.network.NeRFMLP", "depth": 2, "width": 32, "contraction": "l2"},
                   renderer="proposal")  # the proposal experiment with nerf_net=mlp
    with pytest.raises(ValueError, match="model.proposal_net.finest_resolution"):
        _proposal_module(proposal_net={"finest_resolution": [64]})
    with pytest.raises(ValueError, match="model.proposal_net: hash encoding"):
        _proposal_module(proposal_net={"base_resolution": 512})  # above the finest grids, 128 and 256
    with pytest.raises(ValueError, match="model.proposal_net: unknown"):
        _proposal_module(proposal_net={"level": 3})


def test_the_proposal_tables_join_the_table_group_and_the_render_compiles_as_one_unit():
    module = _proposal_module()
    tables = module.table_parameters()
    for network in module.proposal.networks:
        assert all(any(p is t for t in tables) for p in network.encoding.parameters())
    assert len(tables) == len(list(module.coarse.encoding.parameters())) + 4  # 2 levels x 2 proposal networks
    assert module.fine is None
    shared = _proposal_module(proposal_share=True)
    assert len(shared.proposal.networks) == 1
    plan = module.compile_plan()
    assert plan.pays and "proposal rounds" in plan.reason


def test_a_rays_colour_follows_its_images_vector_with_the_proposal_renderer():
    module = _proposal_module(net={"appearance_dim": 4}).eval()
    module.bind_data(TaskData(num_train_images=2))
    with torch.no_grad():
        module.coarse.appearance.weight[0].fill_(-3.0)
        module.coarse.appearance.weight[1].fill_(3.0)
    batch = _ray_batch(16)
    dark, bright = (module.render_rays({**batch, "image": torch.full((16,), i)}, perturb=False) for i in (0, 1))
    assert (dark["rgb"] - bright["rgb"]).abs().max() > 1e-3
    assert torch.equal(dark["acc"], bright["acc"]) and torch.equal(dark["depth"], bright["depth"])


def test_psnr_rises_on_a_tiny_scene_with_the_proposal_renderer(tmp_path):
    torch.manual_seed(0)
    dm = tiny_scene(tmp_path, steps_per_epoch=40)
    module = _proposal_module(num_samples=16, proposal_samples=[32, 16])
    before, after, _ = train_on_tiny_scene(module, dm, lr=1e-2)
    assert after > before + 3.0, (before, after)


def test_a_run_logs_both_losses(make_config, tmp_path):
    run(make_config("model=nerf", "debug=limit", "max_epochs=1", "data.steps_per_epoch=2",
                    "trainer.log_every_n_steps=1",
                    *HASH_CLI, "model.net.contraction=l2", *SMALL_PROPOSALS_CLI))
    text = "".join(p.read_text() for p in (tmp_path / "run" / "csv").rglob("metrics.csv"))
    assert "train/interlevel" in text and "train/distortion" in text and "val/psnr" in text


def test_the_fox_proposal_experiment_composes_without_changing_the_fox_experiment(make_config):
    cfg = make_config("experiment=nerf_hashgrid_fox_proposal", f"data.data_dir={FOX}")
    assert (cfg.model.renderer, cfg.model.net.contraction, cfg.model.num_samples) == ("proposal", "l2", 48)
    assert list(cfg.model.proposal_samples) == [256, 96] and cfg.data.far == 1000.0 and cfg.data.num_rays == 4096
    assert (cfg.model.interlevel_loss_mult, cfg.model.distortion_loss_mult) == (1.0, 0.002)
    fox = make_config("experiment=nerf_hashgrid_fox", f"data.data_dir={FOX}")
    assert (fox.model.renderer, fox.model.net.contraction, fox.data.far) == ("occupancy", "none", 12.0)


def test_the_fox_proposal_experiment_runs(make_config):
    if not FOX.is_dir():
        pytest.skip(f"{FOX} is not here (the shared data folder beside the checkout)")
    # few samples and small proposal networks: the experiment's 256 + 96 + 48 per ray are slow on a CPU
    run(make_config("experiment=nerf_hashgrid_fox_proposal", f"data.data_dir={FOX}", "debug=fast_dev_run",
                    *SMALL_PROPOSALS_CLI))


@pytest.mark.slow
def test_the_compiled_proposal_render_matches_eager():
    """model.compile compiles the whole proposal render as one unit (the plan says static shapes): with midpoint
    samples its loss and gradients are the eager ones, and a new annealing exponent does not recompile. Without
    the interlevel loss: its bound is a step function of the edges, and an edge that lands on a proposal edge
    (both agree to float rounding) may count the neighbouring interval in one and not in the other."""
    from common.fast_path import CompileCounter

    eager = _proposal_module(perturb=False, proposal_anneal_steps=10, interlevel_loss_mult=0.0)
    fast = _proposal_module(perturb=False, proposal_anneal_steps=10, interlevel_loss_mult=0.0, compile=True)
    fast.load_state_dict(eager.state_dict())
    batch = _ray_batch(16)
    losses = []
    for module in (eager, fast):
        losses.append(module.training_step(batch, 0))
        losses[-1].backward()
    assert torch.allclose(losses[1], losses[0], rtol=1e-5, atol=1e-7), losses
    for plain, compiled in zip(eager.parameters(), fast.parameters(), strict=True):
        assert (plain.grad is None) == (compiled.grad is None)
        assert plain.grad is None or torch.allclose(compiled.grad, plain.grad, rtol=1e-4, atol=1e-6)
    fast.training_step(batch, 1).backward()  # the anneal buffer's value changes: no new graph
    counter = CompileCounter().start()
    try:
        fast.training_step(batch, 2).backward()
        graphs, recompiles = counter.counts()
    finally:
        counter.stop()
    assert graphs == 0 and not recompiles


@pytest.mark.slow
def test_a_compiled_step_that_skips_the_proposal_networks_matches_eager():
    eager = _proposal_module(perturb=False)
    fast = _proposal_module(perturb=False, compile=True)
    fast.load_state_dict(eager.state_dict())
    batch = _ray_batch(16)
    for module in (eager, fast):
        out = module.render_rays(batch, perturb=False, train_proposals=False)
        ((out["rgb"] - 0.5).square().mean() + module.proposal.losses(out)[0]).backward()
        assert all(p.grad is None for p in module.proposal.parameters())
    for plain, compiled in zip(eager.coarse.parameters(), fast.coarse.parameters(), strict=True):
        assert (plain.grad is None) == (compiled.grad is None)
        assert plain.grad is None or torch.allclose(compiled.grad, plain.grad, rtol=1e-4, atol=1e-6)


def test_the_proposal_networks_train_on_every_early_step_then_on_one_step_in_update_every():
    sampler = _proposal_module(proposal_update_every=5, proposal_update_warmup=100).proposal
    trained = [sampler.trains_networks(step) for step in range(300)]
    assert all(trained[:10])  # untrained histograms: every step trains them
    assert trained[100:110] == [True, False, False, False, False] * 2  # after the warm-up: one step in 5
    assert 1 / 5 < sum(trained[10:100]) / 90 < 1  # during it the interval grows
    every_step = _proposal_module(proposal_update_every=1).proposal
    assert all(every_step.trains_networks(step) for step in range(300))
    with pytest.raises(ValueError, match="model.proposal_update_every must be >= 1"):
        _proposal_module(proposal_update_every=0)


def test_a_step_that_skips_the_proposal_networks_renders_the_same_and_trains_only_the_field():
    module = _proposal_module()
    torch.manual_seed(1)
    trained = module.render_rays(_ray_batch(16), perturb=True)
    torch.manual_seed(1)
    skipped = module.render_rays(_ray_batch(16), perturb=True, train_proposals=False)
    assert torch.equal(trained["rgb"], skipped["rgb"]) and torch.equal(trained["weights"], skipped["weights"])
    assert any(w.requires_grad for w in trained["proposal_weights"])
    total, logged = module.proposal.losses(skipped)
    ((skipped["rgb"] - 0.5).square().mean() + total).backward()
    assert all(p.grad is None for p in module.proposal.parameters())  # no backward through them
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.coarse.parameters())
    assert logged["train/interlevel"] > 0  # still measured, for the log


def test_ddp_that_expects_every_gradient_is_refused_when_steps_skip_the_proposal_networks():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        module = _proposal_module()
        with pytest.raises(ValueError, match=r"proposal_update_every=5 .*find_unused_parameters=true.*=1"):
            module.proposal.check_wrapper(DistributedDataParallel(module))
        with pytest.raises(ValueError, match="static_graph off"):  # a static graph expects the same gradients
            module.proposal.check_wrapper(DistributedDataParallel(module, find_unused_parameters=True,
                                                                  static_graph=True))
        module.proposal.check_wrapper(DistributedDataParallel(module, find_unused_parameters=True))
        every_step = _proposal_module(proposal_update_every=1)
        every_step.proposal.check_wrapper(DistributedDataParallel(every_step))
        module.proposal.check_wrapper(module)  # one device: nothing to reduce
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_ddp_proposal_run_trains_past_the_skipped_steps_and_without_find_unused_parameters_stops_at_start(cli):
    common = ("model=nerf", "trainer=ddp", "trainer.devices=2", "device=cpu", "logger=csv", "num_workers=0",
              "max_epochs=1", "data.steps_per_epoch=14", "data.val_views=1", "trainer.limit_val_batches=1",
              *HASH_CLI, "model.net.contraction=l2", *SMALL_PROPOSALS_CLI, "model.proposal_update_warmup=0")
    refused = cli(*common, "run_name=refused")
    assert refused.returncode != 0 and "trainer.strategy.find_unused_parameters=true" in refused.stderr
    ran = cli(*common, "trainer.strategy.find_unused_parameters=true", "run_name=ran")  # steps 10-13 skip 3 of 4
    assert ran.returncode == 0, ran.stderr[-3000:]
