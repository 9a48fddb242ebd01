"""NeRF has no data augmentation: asking for it, in either override form, is an error saying so."""
import pytest
from hydra.errors import HydraException
from hydra.utils import instantiate

from datamodules.nerf import NerfDataModule


def test_augment_on_nerf_is_refused_in_either_override_form(make_config):
    with pytest.raises(HydraException, match="Could not override 'data.augment.enabled'") as refused:
        make_config("model=nerf", "data.augment.enabled=true")  # Hydra: nerf's data config has no such key
    assert "Key 'augment' is not in struct" in str(refused.value.__cause__)
    cfg = make_config("model=nerf", "+data.augment.enabled=true")  # `+` adds the key: the datamodule refuses it
    with pytest.raises(Exception, match="data.augment: NeRF has no data augmentation: each training ray is a measurement"):
        instantiate(cfg.data)


def test_nerf_datamodule_refuses_any_augment_setting():
    for value in ({"enabled": True}, {"enabled": False}, True):
        with pytest.raises(ValueError, match="^data.augment: NeRF has no data augmentation"):
            NerfDataModule(augment=value)
    NerfDataModule(augment=None)  # what every config without the key passes
