"""The diffusion arithmetic: schedules, noising, guidance, EMA, seeded sampling, learning."""
import math

import pytest
import torch

from callbacks.ema import EMA, ema_decay
from lightning_modules.diffusion import guided, make_noise_scheduler


def test_linear_schedule_matches_closed_form():
    s = make_noise_scheduler(1000, "linear", 1e-4, 0.02)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert torch.allclose(s.betas.double(), betas, atol=1e-7)
    abar = torch.cumprod(1 - betas, 0)
    assert torch.allclose(s.alphas_cumprod.double(), abar, rtol=1e-4)
    assert s.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4, rel=1e-6)
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=0.02)  # DDPM: abar_T ~ 4e-5


def test_cosine_schedule_matches_closed_form():
    T, s_off = 1000, 0.008
    s = make_noise_scheduler(T, "cosine")
    f = lambda t: math.cos((t / T + s_off) / (1 + s_off) * math.pi / 2) ** 2
    betas = torch.tensor([min(1 - f(t + 1) / f(t), 0.999) for t in range(T)], dtype=torch.float64)
    assert torch.allclose(s.betas.double(), betas, atol=1e-6)
    t = 500  # abar_t = f(t+1)/f(0) for the discrete schedule
    assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-4)


def test_bad_schedule_names_are_clear():
    with pytest.raises(ValueError, match="beta_schedule"):
        make_noise_scheduler(10, "quadratic")
    with pytest.raises(ValueError, match="prediction_type"):
        make_noise_scheduler(10, "linear", prediction_type="sample")


def test_noised_sample_and_targets_at_given_t(tiny_module):
    m = tiny_module()
    x0 = torch.full((2, 1, 16, 16), 0.5)
    noise = torch.full((2, 1, 16, 16), -1.0)
    t = torch.tensor([0, 999])
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    expected = [math.sqrt(abar[i]) * 0.5 - math.sqrt(1 - abar[i]) for i in (0, 999)]
    xt = m.noised(x0, noise, t)
    assert xt[0].flatten()[0].item() == pytest.approx(expected[0], abs=1e-5)
    assert xt[1].flatten()[0].item() == pytest.approx(expected[1], abs=1e-5)
    assert torch.allclose(xt, m.noise_scheduler.add_noise(x0, noise, t), atol=1e-6)
    assert torch.equal(m.target(x0, noise, t), noise)
    v = tiny_module(prediction_type="v_prediction")
    assert torch.allclose(v.target(x0, noise, t), v.noise_scheduler.get_velocity(x0, noise, t), atol=1e-6)


def test_classifier_free_guidance_combination():
    cond, uncond = torch.tensor([1.0, 3.0]), torch.tensor([0.5, 1.0])
    assert torch.allclose(guided(cond, uncond, 2.0), torch.tensor([1.5, 5.0]))
    assert torch.equal(guided(cond, uncond, 1.0), cond)
    assert torch.equal(guided(cond, uncond, 0.0), uncond)


def test_guidance_in_sampling_uses_both_predictions(tiny_module):
    torch.manual_seed(0)
    m = tiny_module(num_inference_steps=2).eval()
    with torch.no_grad():  # make the class embedding matter
        m.unet.class_embedding.weight.normal_(0, 1)
    labels = torch.tensor([0, 1])
    plain = m.sample(labels=labels, seed=1, guidance_scale=1.0)
    strong = m.sample(labels=labels, seed=1, guidance_scale=4.0)
    uncond = m.sample(labels=torch.tensor([-1, -1]), seed=1)
    assert not torch.allclose(plain, strong)
    assert not torch.allclose(plain, uncond)
    assert plain.shape == (2, 1, 16, 16) and plain.min() >= -1 and plain.max() <= 1


def test_guidance_interval_guides_only_inside_it(tiny_module):
    """Guidance only at timesteps lo..hi: an interval holding no sampling step gives the conditional
    model's samples, one holding every step gives fully guided ones."""
    torch.manual_seed(0)
    labels = torch.tensor([0, 1])
    samples = {}
    for name, kw in {"cond": {"guidance_scale": 1.0}, "full": {}, "none": {"guidance_interval": [0, 5]},
                     "all": {"guidance_interval": [0, 999]}, "part": {"guidance_interval": [0, 500]}}.items():
        torch.manual_seed(0)
        m = tiny_module(**{"num_inference_steps": 4, "guidance_scale": 3.0, **kw}).eval()
        with torch.no_grad():
            m.unet.class_embedding.weight.normal_(0, 1)
        samples[name] = m.sample(labels=labels, seed=1)
    assert torch.equal(samples["none"], samples["cond"])  # the 4 trailing steps are 999, 749, 499, 249
    assert torch.equal(samples["all"], samples["full"])
    assert not torch.allclose(samples["part"], samples["full"]) and not torch.allclose(samples["part"], samples["cond"])
    with pytest.raises(ValueError, match=r"model.guidance_interval=\[600, 100\]"):
        tiny_module(guidance_interval=[600, 100])


def test_label_dropout_and_null_class(tiny_module):
    m = tiny_module()
    labels = torch.tensor([0, 1, 2, -1])
    assert m.class_input(labels, 4).tolist() == [0, 1, 2, 3]  # -1 -> null class (= num_classes)
    torch.manual_seed(0)
    dropped = m.class_input(torch.zeros(10_000, dtype=torch.long), 10_000, drop_prob=0.1)
    assert (dropped == 3).float().mean().item() == pytest.approx(0.1, abs=0.015)
    assert tiny_module(num_classes=0).class_input(labels, 4) is None


def test_seeded_sampling_is_reproducible(tiny_module):
    m = tiny_module().eval()
    labels = torch.tensor([0, 2])
    a = m.sample(labels=labels, seed=7)
    b = m.sample(labels=labels, seed=7)
    c = m.sample(labels=labels, seed=8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_ema_decay_warmup_arithmetic():
    assert ema_decay(0, 0.999) == 0.0  # 1 - 1**-p: the first update copies the weights
    assert ema_decay(7, 0.999, power=0.5) == pytest.approx(1 - 8 ** -0.5)
    assert ema_decay(10**9, 0.999) == 0.999
    assert ema_decay(3, 0.9, warmup=False) == 0.9
    assert ema_decay(0, 0.999, min_decay=0.5) == 0.5


def test_ema_update_arithmetic():
    net = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema = EMA(decay=0.5, warmup=False)
    ema.update(net)  # shadow initialised to 1 then lerped toward 1
    with torch.no_grad():
        net.weight.fill_(3.0)
    assert ema.update(net) == 0.5
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 2.0))  # 0.5*1 + 0.5*3
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema.update(net)
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 1.0))
    assert ema.num_updates == 3
    state = ema.state_dict()
    fresh = EMA(decay=0.9)
    fresh.load_state_dict(state)
    assert fresh.num_updates == 3 and torch.equal(fresh.shadow["weight"], ema.shadow["weight"])


def test_loss_falls_on_a_tiny_set(tiny_module):
    torch.manual_seed(0)
    m = tiny_module(num_classes=0)
    x0 = torch.rand(8, 1, 16, 16) * 2 - 1
    g = torch.Generator().manual_seed(0)
    noise, t = torch.randn(x0.shape, generator=g), torch.randint(0, 1000, (8,), generator=g)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    with torch.no_grad():
        before = m.diffusion_loss(x0, None, noise, t).item()
    for _ in range(40):
        loss = m.training_step((x0, torch.full((8,), -1)), 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = m.diffusion_loss(x0, None, noise, t).item()
    assert after < 0.6 * before


def test_unet_config_errors_are_clear(tiny_module):
    with pytest.raises(ValueError, match="norm_num_groups"):
        tiny_module(norm_num_groups=32)
    with pytest.raises(ValueError, match="attention_resolutions"):
        tiny_module(attention_resolutions=(5,))


def test_gradient_checkpointing_and_clean_state_dict(tiny_module):
    m = tiny_module(gradient_checkpointing=True)
    assert m.unet.is_gradient_checkpointing
    assert all(not k.startswith("_compiled") and "_orig_mod" not in k for k in m.state_dict())


def test_compile_keeps_plain_checkpoint_names(tiny_module, monkeypatch):
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager"))
    m = tiny_module(compile=True, num_classes=0)
    loss = m.training_step((torch.zeros(2, 1, 16, 16), torch.full((2,), -1)), 0)
    loss.backward()
    assert m._compiled is not None and torch.isfinite(loss)
    plain = tiny_module(num_classes=0)
    plain.load_state_dict(m.state_dict())  # strict: same names as an uncompiled model


def test_v_prediction_cosine_and_unconditional_sampling_run(tiny_module):
    m = tiny_module(num_classes=0, prediction_type="v_prediction", beta_schedule="cosine").eval()
    x = m.sample(num_images=3, seed=0, num_inference_steps=3)
    assert x.shape == (3, 1, 16, 16) and torch.isfinite(x).all()
    loss = m.training_step((torch.zeros(2, 1, 16, 16), torch.full((2,), -1)), 0)
    assert torch.isfinite(loss)


def test_scale_shift_conditioning_builds_and_the_label_changes_the_prediction(tiny_module):
    module = tiny_module(time_scale_shift="scale_shift").eval()
    x, t = torch.randn(2, module.hparams.channels, module.hparams.image_size, module.hparams.image_size), torch.tensor([500, 500])
    with torch.no_grad():
        one = module(x, t, torch.tensor([0, 0]))
        two = module(x, t, torch.tensor([1, 1]))
    assert one.shape == x.shape and not torch.allclose(one, two)
    with pytest.raises(ValueError, match="time_scale_shift='film'"):
        tiny_module(time_scale_shift="film")


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_clips_the_predicted_x0_only_when_asked(tiny_module, clip):
    """At the first DDIM step (t = T) the predicted x0 lies far outside [-1, 1]; clipping it lost
    the conditioning class as training went on, so the default leaves it alone."""
    m = tiny_module(clip_sample=clip) if clip else tiny_module()
    ddim = m.ddim_scheduler()
    ddim.set_timesteps(50)
    t = ddim.timesteps[0]
    assert int(t) == m.hparams.num_timesteps - 1  # "trailing": sampling starts at pure noise
    x_t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x0 = ddim.step(torch.zeros_like(x_t), t, x_t).pred_original_sample  # eps = 0: x0 = x_t / sqrt(abar_T)
    if clip:
        assert x0.abs().max() <= 1.0
    else:
        assert x0.abs().max() > 10.0
        assert torch.allclose(x0, x_t / m.noise_scheduler.alphas_cumprod[t].sqrt(), rtol=1e-4)
