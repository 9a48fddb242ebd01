"""`model.sample_budget`: the occupancy renderer's training steps shade a fixed number of sample slots (static
shapes: one compiled graph), with the same render as shading exactly the kept samples where the budget holds
them, and rays it cuts short left out of the loss."""
import pytest
import torch

from lightning_modules.nerf import NerfModule
from lightning_modules.nerf.occupancy import place, slots, take
from tests.nerf.test_hashgrid import HASH
from tests.nerf.test_train import TINY, _ray_batch

GRID = {"renderer": "occupancy", "grid_resolution": 4, "march_samples": 16}


def _module(budget, hashgrid: bool = False, **kwargs) -> NerfModule:
    torch.manual_seed(0)
    net = {"net": HASH, "num_samples": 8, "num_importance": 8} if hashgrid else TINY
    return NerfModule(**{**net, **GRID, **kwargs}, sample_budget=budget)


def _step(module: NerfModule, batch: dict) -> tuple[torch.Tensor, dict, list[torch.Tensor]]:
    """One training step's loss, its render, and the gradients it gives the field."""
    render, seen = module.render_rays, {}
    module.render_rays = lambda *a, **k: seen.setdefault("out", render(*a, **k))
    torch.manual_seed(1)  # the march's jitter
    loss = module.training_step(batch, 0)
    module.zero_grad()
    loss.backward()
    return loss, seen["out"], [p.grad.clone() for p in module.coarse.parameters() if p.grad is not None]


def test_slots_hold_the_first_kept_samples_in_ray_order_and_place_puts_them_back():
    keep = torch.tensor([[True, False, True], [False, True, True]])
    values = torch.arange(6.0).reshape(2, 3)
    chosen = slots(keep, 3)
    assert chosen.index.tolist() == [0, 2, 4] and chosen.keep.tolist() == [[True, False, True], [False, True, False]]
    assert take(values, chosen).tolist() == [0.0, 2.0, 4.0]
    assert place(take(values, chosen), chosen).tolist() == [[0.0, 0.0, 2.0], [0.0, 4.0, 0.0]]
    roomy = slots(keep, 6)  # more slots than samples: the empty ones point past the last sample
    assert roomy.index.tolist() == [0, 2, 4, 5, 6, 6] and torch.equal(roomy.keep, keep)
    assert torch.equal(place(take(values, roomy), roomy), values * keep)
    exact = slots(keep, None)
    assert exact.index is None and torch.equal(place(take(values, exact), exact), values * keep)


@pytest.mark.parametrize("hashgrid", [False, True], ids=["mlp", "hashgrid"])
def test_a_budget_that_holds_every_kept_sample_trains_as_shading_exactly_them(hashgrid):
    batch = _ray_batch(8)
    exact_module = _module(None, hashgrid)
    exact_module.trained_in_step = torch.tensor(-1)  # a stale count: the exact path's step must clear it
    exact_loss, exact, exact_grads = _step(exact_module, batch)
    assert exact_module.items_trained(batch) == 8  # the exact path trains every ray of the batch
    loss, out, grads = _step(_module(8 * 16, hashgrid), batch)  # every candidate sample has a slot
    assert out["complete"].all() and "complete" not in exact
    assert torch.allclose(out["rgb"], exact["rgb"], atol=1e-6) and torch.allclose(loss, exact_loss, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, exact_grads, strict=True))


def test_rays_a_small_budget_cuts_short_are_left_out_of_the_loss_and_counted():
    batch = _ray_batch(8)
    _, exact, _ = _step(_module(None, early_stop_eps=0.0), batch)
    kept = int((exact["weights"] > 0).sum())
    module = _module(kept // 2, early_stop_eps=0.0)
    loss, out, _ = _step(module, batch)
    complete = out["complete"]
    assert 0 < complete.sum() < len(complete)  # the first rays in the batch got their samples, the last did not
    assert torch.allclose(out["rgb"][complete], exact["rgb"][complete], atol=1e-6)  # theirs is the exact render
    target = batch["rgb"][complete]
    assert torch.allclose(loss, ((out["rgb"][complete] - target) ** 2).mean(), atol=1e-6)
    logged = {}
    module.log_train_step = lambda values, **kw: logged.update(values)
    torch.manual_seed(1)
    module.training_step(batch, 0)
    assert float(logged["train/incomplete_rays"]) == pytest.approx(1.0 - float(complete.float().mean()))
    assert float(logged["train/budget_used"]) == 1.0  # a budget too small for the batch: every slot holds a sample
    assert "train/march_budget_used" not in logged  # no early-stop pass without early termination
    assert module.items_trained(batch) == complete.sum()  # throughput counts the rays that trained, not the batch's
    _, roomy, _ = _step(_module(8 * 16, early_stop_eps=0.0), batch)
    assert float(roomy["slots_used"]) == pytest.approx(kept / (8 * 16))  # the rest of the slots were padding


def test_with_early_ray_termination_the_rays_marked_complete_render_exactly():
    """The early-stop pass shades in slots too: a ray whose samples missed a slot there would read empty and keep
    samples behind its surface. Complete means complete in both passes."""
    from lightning_modules.nerf.occupancy import OccupancyGrid

    torch.manual_seed(3)
    batch, grid = _ray_batch(16), OccupancyGrid(resolution=4, march_samples=32)
    grid.set_aabb(batch["aabb"])
    density = lambda p: 30.0 * (p.norm(dim=-1) < 0.7).float() + 0.5  # noqa: E731  an opaque ball: rays stop early
    args = (lambda p, v, i: (density(p), torch.sigmoid(p * 3)), density, *(batch[k] for k in
            ("origins", "dirs", "near", "far", "background")), False, None, 1e-4)
    exact = grid.render(*args)
    before = int(grid.march(*(batch[k] for k in ("origins", "dirs", "near", "far")), False).keep.sum())
    after = int((exact["weights"] > 0).sum())
    assert after < before  # early stop dropped samples
    for budget in (after, (after + before) // 2, before):
        out = grid.render(*args, budget=(budget, budget))
        complete = out["complete"]
        assert complete.any() and torch.allclose(out["rgb"][complete], exact["rgb"][complete], atol=1e-6), budget
    assert out["complete"].all()


def test_a_shading_budget_below_the_sample_budget_holds_what_early_termination_leaves():
    """The pass with gradients shades only what early ray termination keeps: its own, smaller slots (no padding
    the field's backward runs on) give the same render where they hold those samples."""
    batch = _ray_batch(8)
    _, exact, exact_grads = _step(_module(None, hashgrid=True), batch)
    shaded = int(exact["weights"].ne(0).sum())
    _, out, grads = _step(_module(8 * 16, hashgrid=True, shade_budget=shaded), batch)
    assert out["complete"].all() and float(out["slots_used"]) == 1.0  # every shading slot held a sample
    marched = round(float(out["march_slots_used"]) * 8 * 16)  # samples in occupied cells
    assert shaded <= marched < 8 * 16  # the early-stop pass's slots: the occupied cells' samples, the rest padding
    use = _module(8 * 16, hashgrid=True, shade_budget=shaded).grid.budget_use(out, read=False)
    assert float(use["train/march_budget_used"]) == pytest.approx(marched / (8 * 16))
    assert torch.allclose(out["rgb"], exact["rgb"], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, exact_grads, strict=True))
    _, short, _ = _step(_module(8 * 16, hashgrid=True, shade_budget=shaded // 2), batch)
    assert 0 < short["complete"].sum() < 8  # too few shading slots: the last rays are cut short


def test_cut_rays_leave_the_distortion_loss_too_and_a_budget_that_cuts_every_ray_warns(caplog):
    from lightning_modules.nerf.rendering import interval_distortion

    batch = _ray_batch(8)
    _, out, _ = _step(_module(24, occupancy_distortion_loss_mult=0.01), batch)
    complete = out["complete"]
    assert 0 < complete.sum() < len(complete)
    over_complete = interval_distortion(out["spacing_mids"][complete] if out["spacing_mids"].shape[0] > 1
                                        else out["spacing_mids"], 1.0 / 16, out["weights"][complete])
    module = _module(24, occupancy_distortion_loss_mult=0.01)
    assert torch.allclose(module.grid.distortion(out), over_complete)
    with caplog.at_level("WARNING"):
        use = module.grid.budget_use({"complete": torch.zeros(4, dtype=torch.bool), "slots_used": torch.tensor(1.0)},
                                     read=True)
        assert float(use["train/incomplete_rays"]) == 1.0
    assert "model.sample_budget: 24 samples (24 shaded) held no ray's samples this step: nothing trained" in caplog.text


def test_a_view_rendered_by_a_module_left_in_training_mode_still_shades_every_kept_sample():
    """load_from_checkpoint returns a module in training mode: its views must not be cut to the budget."""
    module, batch = _module(4), _ray_batch(8)
    assert module.training
    view = module.render_view(batch)
    module.eval()
    assert torch.allclose(view["rgb"], module.render_view(batch)["rgb"])


def test_a_budgeted_training_render_traces_as_one_graph_and_a_view_still_shades_every_kept_sample():
    module = _module(8 * 16)
    plan = module.compile_plan()
    assert plan.pays and plan.mode == "reduce-overhead" and "march, field" in plan.reason
    assert not _module(None).compile_plan().pays
    assert "(coarse, compositing)" in NerfModule(**{**TINY, "num_importance": 0}).compile_plan().reason  # no fine net
    batch = _ray_batch(8)
    module._ensure_grid(batch["aabb"])
    budgeted = lambda *args: module._render_occupancy(*args, budgets=module.grid.budgets)  # noqa: E731
    render = torch.compile(budgeted, backend="eager", fullgraph=True)  # fails on any graph break
    out = render(*(batch[k] for k in ("origins", "dirs", "near", "far", "background")), True, None)
    assert out["complete"].all()
    module.eval()
    assert "complete" not in module.render_rays(batch, perturb=False)  # views: exactly the kept samples


def test_auto_renders_exactly_through_the_grids_warm_up_then_sizes_both_budgets_from_its_counts(caplog):
    from lightning_modules.nerf.occupancy import AUTO_HEADROOM, budget_ladder

    module, batch = _module("auto", grid_warmup_steps=3), _ray_batch(8)
    module.coarse.sigma.bias.data.fill_(20.0)  # a dense field: light is used up a few samples in
    seen = []
    render = module.render_rays
    module.render_rays = lambda *a, **k: seen.append(render(*a, **k)) or seen[-1]
    with caplog.at_level("INFO"):
        for step in range(4):
            module.training_step(batch, step)
    assert ["complete" in out for out in seen] == [False, False, False, True]  # exact through the warm-up
    occupied, shaded = (max(c[i] for c in module.grid._counted) for i in (0, 1))
    assert 0 < shaded < occupied  # early ray termination left fewer samples to shade than the occupied cells held
    assert module.grid.budgets == tuple(budget_ladder(AUTO_HEADROOM * m) for m in (occupied, shaded))
    assert "model.sample_budget: auto: 1024 samples a step in occupied cells" in caplog.text
    assert seen[-1]["complete"].all()  # the budget holds a batch like the warm-up's
    module.eval()
    assert module.render_view(batch)["rgb"].shape == (8, 3) and len(module.grid._counted) == 3  # views count nothing


def test_auto_counts_training_renders_only_and_never_sizes_a_budget_below_its_rounding():
    from lightning_modules.nerf.occupancy import AUTO_ROUND

    module, batch = _module("auto", grid_warmup_steps=1), _ray_batch(8)
    module.eval()
    module.render_rays(batch, perturb=False)  # with gradients on, but not training
    assert len(module.grid._counted) == 0
    module.train()
    batch["origins"] = torch.tensor([[5.0, 5.0, 4.0]]).expand(8, 3)  # rays that miss the box: no sample to keep
    for step in range(2):
        module.training_step(batch, step)
    assert list(module.grid._counted) == [(0, 0)] and module.grid.budgets == (AUTO_ROUND, AUTO_ROUND)


def test_auto_budgets_sit_on_a_ladder_so_runs_that_count_a_little_differently_compile_the_same_shapes():
    from lightning_modules.nerf.occupancy import AUTO_ROUND, budget_ladder

    assert budget_ladder(0) == budget_ladder(AUTO_ROUND) == AUTO_ROUND
    assert budget_ladder(300_000) == budget_ladder(310_000) == 312_320  # 1024 x ceil(2^(33/4))
    for samples in (1025, 5_000, 123_456, 265_897 * 1.1, 2**20):
        size = budget_ladder(samples)
        assert samples <= size < 1.19 * samples + AUTO_ROUND and size % AUTO_ROUND == 0  # a rung is 2^(1/4) apart
    assert len({budget_ladder(n) for n in range(2**17 + 1, 2**19 + 1, 997)}) == 8  # two octaves: eight rungs


def test_a_sample_budget_is_refused_where_it_cannot_apply():
    with pytest.raises(ValueError, match="model.sample_budget must be a number of samples > 0 .*auto: sized"):
        _module(0)
    with pytest.raises(ValueError, match="model.shade_budget=64: model.sample_budget=auto sizes both"):
        _module("auto", shade_budget=64)
    with pytest.raises(ValueError, match="model.shade_budget=64 is the part of model.sample_budget=null .* set sample_budget"):
        _module(None, shade_budget=64)
    with pytest.raises(ValueError, match="model.shade_budget=64 is the part of model.sample_budget=32"):
        _module(32, shade_budget=64)
    with pytest.raises(ValueError, match=r"\(model.early_stop_eps=0.0\).*without early termination sample_budget alone"):
        _module(128, shade_budget=64, early_stop_eps=0.0)  # no early-stop pass: shade_budget would be the only one
    unused = NerfModule.inapplicable_settings({"renderer": "proposal"})
    assert "sample_budget" in unused and "occupancy renderer's setting" in unused["sample_budget"]


def test_a_run_with_a_sample_budget_logs_the_share_of_rays_it_cut_short(make_config, tmp_path):
    import csv

    from suite.train import run
    from tests.nerf.test_train import TINY_DATA_CLI, TINY_NET_CLI, TINY_OCCUPANCY_CLI

    run(make_config("model=nerf", *TINY_NET_CLI, *TINY_OCCUPANCY_CLI, *TINY_DATA_CLI, "model.sample_budget=256",
                    "trainer.max_steps=3", "trainer.log_every_n_steps=1", "trainer.limit_val_batches=0",
                    "trainer.num_sanity_val_steps=0", "logger=csv"))
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        shares = [float(r["train/incomplete_rays"]) for r in csv.DictReader(f) if r.get("train/incomplete_rays")]
    assert len(shares) == 3 and all(0.0 < share < 1.0 for share in shares)  # 64 rays x up to 32 samples in 256 slots


def test_auto_from_the_command_line_sizes_the_budget_after_the_grids_warm_up(make_config, tmp_path, caplog):
    import csv

    from suite.train import run
    from tests.nerf.test_train import TINY_DATA_CLI, TINY_NET_CLI, TINY_OCCUPANCY_CLI

    with caplog.at_level("INFO"):
        run(make_config("model=nerf", *TINY_NET_CLI, *TINY_OCCUPANCY_CLI, *TINY_DATA_CLI, "model.sample_budget=auto",
                        "model.grid_warmup_steps=2", "trainer.max_steps=4", "trainer.limit_val_batches=0",
                        "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1", "logger=csv"))
    assert "model.sample_budget: auto:" in caplog.text
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        budgeted = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/budget_used")]
    assert budgeted == [2, 3]  # exact through the 2 warm-up steps, then in the sized slots


# a run stopped after the grid's warm-up (4 steps) and after `auto` sized its budgets, between two grid updates
# (the exact path's resume is a cell of test_every_task_stopped_mid_epoch_resumes_to_the_uninterrupted_weights)
def test_an_occupancy_run_with_auto_budgets_resumes_to_the_uninterrupted_runs_grid_and_weights(tmp_path):
    from tests.nerf.test_train import TINY_DATA_CLI, TINY_NET_CLI, TINY_OCCUPANCY_CLI
    from tests.training_helpers import stopped_and_resumed

    exact = ("model=nerf", *TINY_NET_CLI, *TINY_OCCUPANCY_CLI, *TINY_DATA_CLI, "model.sample_budget=auto",
             "model.grid_warmup_steps=4", "model.grid_update_every=3", "deterministic=true", "max_epochs=2",
             "data.steps_per_epoch=5", "trainer.num_sanity_val_steps=0")
    stop = ("+callbacks.stop._target_=tests.training_helpers.SignalAt", "+callbacks.stop.step=7")
    resumed, reference, _ = stopped_and_resumed(tmp_path, exact, stop)
    resumed, reference = resumed["state_dict"], reference["state_dict"]
    assert resumed.keys() == reference.keys()
    for name in resumed:  # the grid's densities and occupied cells too: its updates keep their schedule
        assert torch.equal(resumed[name], reference[name]), name


def test_the_grids_schedule_and_auto_budgets_travel_in_its_state_and_older_checkpoints_load_without_them():
    import pickle

    module = _module("auto")
    module.grid.steps, module.grid._sized = 40, (2048, 1024)
    module.grid._counted.extend([(900, 300), (1000, 400)])
    state = module.state_dict()
    restored = _module("auto")
    restored.load_state_dict(state)
    assert restored.grid.steps == 40 and restored.grid.budgets == (2048, 1024)
    assert list(restored.grid._counted) == [(900, 300), (1000, 400)]
    older = {k: v for k, v in state.items() if k not in module.run_state}
    restored.load_state_dict(older)  # strict: a checkpoint from before the schedule was saved
    assert restored.grid.steps == 0 and restored.grid.budgets is None and not restored.grid._counted, "warms up again"
    pickle.dumps(restored.grid)  # its hooks are plain functions
