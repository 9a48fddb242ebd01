"""Each task's network is a nested config, model.net, with its own `_target_` (common/network_config.py).
Checkpoints written before that, whose hyperparameters hold the network's settings flat, still load;
an old command line that sets one of them flat is refused, naming the new key."""
from __future__ import annotations

import lightning
import pytest
import torch

from suite.config_checks import ConfigError

CLINICAL_NET = {"_target_": "lightning_modules.clinical.network.PatchTransformer", "patch_len": 12, "d_model": 16,
                "n_heads": 2, "d_ff": 32}
DETECTOR = {"_target_": "lightning_modules.license_plate.detector.build_detector", "backbone": "mobilenet_v3_small",
            "min_size": 64, "max_size": 96}
UNET = {"_target_": "lightning_modules.diffusion.unet.build_unet", "block_out_channels": [8, 16],
        "layers_per_block": 1, "norm_num_groups": 8, "attention_resolutions": [8]}
MLP = {"_target_": "lightning_modules.nerf.network.NeRFMLP", "depth": 2, "width": 16, "skips": [1], "pos_freqs": 2,
       "dir_freqs": 2}
SMALL = {  # (module, its constructor arguments in the new form: a small network)
    "clinical": ("lightning_modules.clinical.ClinicalForecaster", {"sequence_length": 48, "net": CLINICAL_NET}),
    "license_plate": ("lightning_modules.license_plate.LicensePlateModule", {"net": DETECTOR}),
    "diffusion": ("lightning_modules.diffusion.DiffusionModule", {"image_size": 16, "num_classes": 2, "net": UNET}),
    "nerf": ("lightning_modules.nerf.NerfModule", {"num_importance": 4, "net": MLP}),
}


def _flat(hparams: dict) -> dict:
    """Hyperparameters as a checkpoint from before model.net stores them: the network's settings flat."""
    net = hparams["net"]
    return {**{k: v for k, v in hparams.items() if k != "net"},
            **{k: v for k, v in net.items() if k != "_target_"}}


@pytest.mark.parametrize("task", SMALL)
def test_a_checkpoint_with_flat_network_settings_loads_into_the_nested_config(task, tmp_path):
    from hydra.utils import get_class

    target, kwargs = SMALL[task]
    cls = get_class(target)
    module = cls(**kwargs)
    for form, hparams in (("new", dict(module.hparams)), ("old", _flat(dict(module.hparams)))):
        path = tmp_path / f"{form}.ckpt"
        torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams,
                    "pytorch-lightning_version": lightning.__version__}, path)
        loaded = cls.load_from_checkpoint(path, weights_only=True)
        assert loaded.hparams.net == module.hparams.net, form
        assert set(loaded.hparams) == set(module.hparams), form  # the old form is saved again in the new one
        theirs = loaded.state_dict()
        assert all(torch.equal(theirs[k], v) for k, v in module.state_dict().items()), form


def test_an_old_runs_stored_config_builds_the_same_network(make_config, tmp_path):
    """Evaluating an old checkpoint builds the model from the run config stored in it (flat)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = make_config("model=clinical", "model.net.d_model=16", "model.net.d_ff=32")
    model = OmegaConf.to_container(cfg.model)
    old = {**{k: v for k, v in model.items() if k not in ("net", "_recursive_")},
           **{k: v for k, v in model["net"].items() if k != "_target_"}}
    new = instantiate(cfg.model)
    flat = instantiate(OmegaConf.create({**old, "sequence_length": cfg.data.sequence_length,
                                         "prediction_horizon": cfg.data.prediction_horizon, "covariates": [],
                                         "interval_minutes": cfg.data.interval_minutes}))
    assert flat.hparams.net == new.hparams.net and flat.net.embed.out_features == 16


@pytest.mark.parametrize("override,task", [
    ("model.d_model=64", "clinical"), ("model.min_size=256", "license_plate"),
    ("model.layers_per_block=1", "diffusion"), ("model.width=64", "nerf")])
def test_an_old_command_line_names_the_new_key(make_config, override, task):
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=f"{key} is now model.net.{key[6:]}.*Use model.net.{key[6:]}={value}"):
        make_config(f"model={task}", override)


@pytest.mark.parametrize("override", ["model.field=hashgrid", "model.net=hashgrid"])
def test_choosing_nerfs_field_by_key_points_to_its_config_group(make_config, override):
    with pytest.raises(ConfigError, match=r"chosen with the nerf_net group; use nerf_net=hashgrid \(conf/nerf_net/hashgrid.yaml\)"):
        make_config("model=nerf", override)


def test_a_task_whose_key_did_not_move_is_not_refused():
    from suite.compose import moved_setting

    assert moved_setting(["model=legal_bert", "model.dropout=0.2"]) is None
    assert moved_setting(["experiment=mnist_cond", "model.guidance_scale=3"]) is None
    assert "model.net.dropout=0.2" in moved_setting(["experiment=mnist_cond", "model.dropout=0.2"])


def test_a_network_setting_of_the_wrong_type_names_its_nested_key(make_config):
    from suite.config_checks import check_arguments

    with pytest.raises(ConfigError, match=r"model\.net\.d_model='wide': expected int"):
        check_arguments(make_config("model=clinical", "model.net.d_model=wide"), "model")
