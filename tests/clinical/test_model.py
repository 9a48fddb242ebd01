"""Network masks, metrics, scaling, baselines and learning of the clinical forecaster."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError

from datamodules.clinical import Segment, WindowDataset
from lightning_modules.clinical import ClinicalForecaster, ForecastMetrics, PatchTransformer, clarke_zones
from lightning_modules.clinical.module import fill_missing


def batch_of(B=3, L=64, C=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": 100 + 20 * torch.randn(B, L, C, generator=g), "observed": torch.ones(B, L, dtype=torch.bool),
            "present": torch.ones(B, L, dtype=torch.bool), "minute": torch.arange(L).float().expand(B, L) * 5 % 1440,
            "y": 100 + 20 * torch.randn(B, 12, generator=g)}


def small_net(**kw):
    args = {"in_channels": 1, "sequence_length": 64, "horizon": 12, "patch_len": 8, "d_model": 16, "n_heads": 2,
            "n_layers": 2, "d_ff": 32, "dropout": 0.0}
    args.update(kw)
    net = PatchTransformer(**args)
    torch.nn.init.normal_(net.head.weight, std=0.1)  # zero-initialised head would hide the encoder
    return net.eval()


# ---- masks reach the attention -------------------------------------------------------------
def test_missing_patches_get_no_attention_and_do_not_change_the_forecast():
    net = small_net()
    b = batch_of()
    b["observed"][:, :24] = False  # first 3 patches of 8 fully missing (padding)
    b["present"][:, :24] = False
    with torch.no_grad():
        out, maps = net(b["x"], b["observed"], b["present"], b["minute"], return_attention=True)
        assert len(maps) == 2 and maps[0].shape == (3, 8, 8)
        for w in maps:
            assert torch.all(w[:, 3:, :3] == 0)  # valid queries never look at missing keys
            torch.testing.assert_close(w.sum(-1), torch.ones(3, 8))
        x2 = b["x"].clone()
        x2[:, :24] = 1e4  # garbage where nothing was observed
        torch.testing.assert_close(net(x2, b["observed"], b["present"], b["minute"]), out)


def test_interpolated_only_patch_is_masked_but_its_values_are_input():
    net = small_net()
    b = batch_of(B=1)
    b["observed"][:, 8:16] = False  # patch 1 only interpolated
    with torch.no_grad():
        _, maps = net(b["x"], b["observed"], b["present"], b["minute"], return_attention=True)
    assert torch.all(maps[0][0, [0, 2, 3, 4, 5, 6, 7], 1] == 0)
    assert net.patch_mask(b["observed"]).tolist() == [[True, False] + [True] * 6]


def test_causal_attention_hides_later_patches():
    net = small_net(causal=True)
    b = batch_of(B=2)
    with torch.no_grad():
        _, maps = net(b["x"], b["observed"], b["present"], b["minute"], return_attention=True)
    assert torch.all(maps[0].triu(1) == 0) and torch.all(maps[1].triu(1) == 0)


def test_sdpa_path_matches_explicit_attention():
    net = small_net(causal=True)
    b = batch_of()
    b["observed"][:, :8] = False
    with torch.no_grad():
        fast = net(b["x"], b["observed"], b["present"], b["minute"])
        slow, _ = net(b["x"], b["observed"], b["present"], b["minute"], return_attention=True)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_sequence_not_multiple_of_patch_is_left_padded():
    net = small_net(sequence_length=60)
    b = batch_of(L=60)
    assert net.num_patches == 8
    assert net(b["x"], b["observed"], b["present"], b["minute"]).shape == (3, 12)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = small_net().train()
    c = small_net(gradient_checkpointing=True).train()
    c.load_state_dict(a.state_dict())
    b = batch_of()
    for net in (a, c):
        net(b["x"] / 100, b["observed"], b["present"], b["minute"]).square().mean().backward()
    for (n, p), q in zip(a.named_parameters(), c.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_fill_missing_carries_forward_and_back():
    x = torch.tensor([[0.0, 0.0, 5.0, 6.0, 0.0, 8.0]])
    present = torch.tensor([[False, False, True, True, False, True]])
    assert fill_missing(x, present).tolist() == [[5.0, 5.0, 5.0, 6.0, 6.0, 8.0]]


# ---- metrics -------------------------------------------------------------------------------
def test_forecast_metrics_against_hand_and_torchmetrics():
    pred = torch.tensor([[100.0, 110.0], [200.0, 150.0]])
    target = torch.tensor([[110.0, 100.0], [180.0, 150.0]])
    m = ForecastMetrics(horizon=2)
    m.update(pred, target)
    out = m.compute()
    assert out["rmse"].item() == pytest.approx(math.sqrt((100 + 100 + 400 + 0) / 4))
    assert out["mae"].item() == pytest.approx(40 / 4)
    assert out["mape"].item() == pytest.approx(100 * (10 / 110 + 10 / 100 + 20 / 180) / 4)
    assert out["rmse_step"].tolist() == pytest.approx([math.sqrt(250), math.sqrt(50)])
    tm_mse = MeanSquaredError(num_outputs=2)(pred, target)
    tm_mae = MeanAbsoluteError(num_outputs=2)(pred, target)
    assert out["rmse_step"].square().float().tolist() == pytest.approx(tm_mse.tolist())
    assert out["mae_step"].float().tolist() == pytest.approx(tm_mae.tolist())
    assert out["clarke_a"].item() == pytest.approx(100.0)  # all within 20%


def test_metric_moves_the_right_way():
    target = 100 + 50 * torch.rand(64, 12)
    good, bad = ForecastMetrics(12), ForecastMetrics(12)
    good.update(target + 2 * torch.randn_like(target), target)
    bad.update(target + 20 * torch.randn_like(target), target)
    g, b = good.compute(), bad.compute()
    assert g["rmse"] < b["rmse"] and g["mae"] < b["mae"] and g["clarke_a"] > b["clarke_a"]


@pytest.mark.parametrize("ref, pred, zone", [
    (100, 110, 0), (60, 50, 0),        # A: within 20%, or both below 70
    (100, 135, 1), (300, 220, 1),      # B
    (100, 215, 2), (150, 20, 4),       # C: overcorrection; E: 150? no -> see below
    (250, 120, 3), (50, 100, 3),       # D: missed hyper / hypo
    (200, 60, 4), (60, 200, 4),        # E: opposite treatment
])
def test_clarke_zones(ref, pred, zone):
    if (ref, pred) == (150, 20):
        zone = 2  # 130 <= ref <= 180 and pred <= 7/5 ref - 182 = 28: zone C (ref < 180, so not E)
    assert clarke_zones(torch.tensor([float(ref)]), torch.tensor([float(pred)])).item() == zone


# ---- scaling, baselines, checkpoints ---------------------------------------------------------
def sine_segments(n=4, T=600, seed=0):
    rng = np.random.default_rng(seed)
    segs = []
    for i in range(n):
        t = np.arange(T)
        v = 140 + 40 * np.sin(2 * np.pi * t / 48 + rng.uniform(0, 6)) + rng.normal(0, 1, T)
        segs.append(Segment(f"s{i}", pd.Timestamp("2024-01-01"), pd.Timedelta(minutes=5),
                            v[:, None].astype(np.float32), np.ones(T, bool)))
    return segs


def make_module(**kw):
    args = {"sequence_length": 96, "prediction_horizon": 12, "patch_len": 16, "d_model": 32, "n_heads": 2,
            "n_layers": 1, "d_ff": 64, "dropout": 0.0, "linear_skip_lags": 0, "ridge_lags": 24}
    args.update(kw)
    return ClinicalForecaster(**args)


def test_scaling_is_inverted_for_metrics_and_kept_in_checkpoint(tmp_path):
    module = make_module()
    module.set_scaler({"mean": [150.0], "std": [50.0]})
    b = batch_of(B=2, L=96)
    out = module.forecast(b)
    # the head starts at zero, so the untrained forecast is the last value, in mg/dL
    torch.testing.assert_close(out["model"], b["x"][:, -1:, 0].expand(-1, 12))
    torch.testing.assert_close(out["persistence"], b["x"][:, -1:, 0].expand(-1, 12))
    module.fit_ridge(WindowDataset(sine_segments(2), 96, 12, 6))
    torch.save({"state_dict": module.state_dict()}, tmp_path / "m.pt")
    fresh = make_module()
    fresh.load_state_dict(torch.load(tmp_path / "m.pt")["state_dict"])
    assert fresh.value_mean.item() == 150.0 and fresh.value_std.item() == 50.0 and fresh._ready == [True, True]
    torch.testing.assert_close(fresh.forecast(b)["ridge"], module.forecast(b)["ridge"])


def test_training_step_without_scaler_says_what_to_do():
    module = make_module()
    with pytest.raises(RuntimeError, match="set_scaler"):
        module.training_step(batch_of(L=96), 0)


def test_covariate_count_mismatch_is_clear():
    module = make_module(covariates=["carbs"])
    with pytest.raises(ValueError, match="model.covariates"):
        module.set_scaler({"mean": [150.0], "std": [50.0]})


def test_learns_to_beat_persistence_and_ridge_on_a_learnable_signal():
    torch.manual_seed(0)
    train = WindowDataset(sine_segments(6, seed=0), 96, 12, stride=2)
    val = WindowDataset(sine_segments(2, seed=1), 96, 12, stride=6)
    module = make_module(ridge_lags=2, linear_skip_lags=0)
    values = np.concatenate([s.values[:, 0] for s in train.segments])
    module.set_scaler({"mean": [values.mean()], "std": [values.std()]})
    module.fit_ridge(train)
    module.log = lambda *a, **k: None  # outside a Trainer
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True)
    module.train()
    for _ in range(3):
        for i, batch in enumerate(loader):
            loss = module.training_step(batch, i)
            opt.zero_grad()
            loss.backward()
            opt.step()
    module.eval()
    metrics = {k: ForecastMetrics(12, clarke=False) for k in ("model", "persistence", "ridge")}
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(val, batch_size=64):
            out = module.forecast(batch)
            for k, m in metrics.items():
                m.update(out[k], batch["y"])
    rmse = {k: m.compute()["rmse"].item() for k, m in metrics.items()}
    print(rmse)
    assert rmse["model"] < 0.5 * rmse["persistence"], rmse
    assert rmse["model"] < rmse["ridge"], rmse


def test_skip_initialised_from_ridge_forecasts_like_ridge():
    module = make_module(linear_skip_lags=24, ridge_lags=24)
    train = WindowDataset(sine_segments(3), 96, 12, stride=4)
    values = np.concatenate([s.values[:, 0] for s in train.segments])
    module.set_scaler({"mean": [values.mean()], "std": [values.std()]})
    module.fit_ridge(train)
    assert module.init_skip_from_ridge()
    b = batch_of(B=4, L=96)
    out = module.eval().forecast(b)
    torch.testing.assert_close(out["model"], out["ridge"], atol=1e-3, rtol=1e-4)
    assert not make_module(linear_skip_lags=12, ridge_lags=24).init_skip_from_ridge()


def test_long_gap_from_the_records_reaches_the_attention_mask():
    # a 2-hour sensor outage kept inside the series (split_gaps=false) becomes fully missing patches
    T = 200
    observed = np.ones(T, bool)
    observed[100:124] = False
    values = (140 + 10 * np.sin(np.arange(T) / 10)).astype(np.float32)[:, None]
    seg = Segment("s", pd.Timestamp("2024-01-01"), pd.Timedelta(minutes=5), values, observed, observed.copy())
    ds = WindowDataset([seg], sequence_length=96, prediction_horizon=12, stride=1)
    k = next(i for i in range(len(ds)) if ds.windows[i][1] == 100 - 32)  # gap covers inputs 32..55
    item = ds[k]
    assert not item["observed"][32:56].any() and not item["present"][32:56].any()
    net = small_net(sequence_length=96)
    batch = {key: v[None] for key, v in item.items()}
    with torch.no_grad():
        _, maps = net(batch["x"] / 100, batch["observed"], batch["present"], batch["minute"], return_attention=True)
    valid = net.patch_mask(batch["observed"])[0]
    assert valid.tolist() == [True] * 4 + [False] * 3 + [True] * 5  # patches of 8: 32..55 are patches 4, 5, 6
    assert torch.all(maps[0][0][valid][:, ~valid] == 0)


def test_ridge_alpha_auto_picks_little_shrinkage_for_signal_and_much_for_noise():
    """model.ridge_alpha=auto: blocked cross-validation on the training windows alone."""
    from lightning_modules.clinical.module import RIDGE_ALPHAS, blocked_cv_alpha

    rng = np.random.default_rng(0)
    feats = np.c_[rng.normal(size=(600, 20)), np.ones(600)]
    signal = feats[:, :20] @ rng.normal(size=(20, 3))
    assert blocked_cv_alpha(feats, signal + 0.01 * rng.normal(size=(600, 3))) <= 0.3
    assert blocked_cv_alpha(feats, rng.normal(size=(600, 3))) >= 100.0
    assert {blocked_cv_alpha(feats, signal)} <= set(RIDGE_ALPHAS)
    with pytest.raises(ValueError, match="model.ridge_alpha='best'"):
        ClinicalForecaster(sequence_length=48, patch_len=12, ridge_alpha="best")


def test_the_attention_plot_leaves_out_the_padding_of_the_window_it_shows():
    from callbacks.forecast_plots import first_real_patch

    present = torch.zeros(10, dtype=torch.bool)
    present[5:] = True                           # 5 real inputs after 5 of left padding
    assert first_real_patch(present, 5) == 2     # patches of 2: [0,1] [2,3] [4,5] -> patch 2 holds input 5
    assert first_real_patch(present, 4) == 2     # 10 steps in 4 patches of 3, padded by 2 on the left
    assert first_real_patch(torch.ones(10, dtype=torch.bool), 5) == 0
