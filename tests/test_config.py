"""Every config group entry composes and instantiates; bad input gives a clear error."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import CONF


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


TASKS = options("model")


def test_every_task_has_its_paired_configs():
    assert TASKS, "no task configs found in conf/model"
    for task in TASKS:
        assert (CONF / "data" / f"{task}.yaml").is_file(), f"conf/data/{task}.yaml missing"
        assert (CONF / "hparams_search" / f"{task}_optuna.yaml").is_file(), f"no Optuna search for {task}"
        assert (CONF.parent / "sweeps" / "wandb" / f"{task}.yaml").is_file(), f"no W&B sweep for {task}"


@pytest.mark.parametrize("name", options("optimizer"))
def test_optimizer_configs_build_optimizers(make_config, name):
    cfg = make_config("model=tiny", f"optimizer={name}")
    optimizer = instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(2, 2))])
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert optimizer.param_groups[0]["lr"] == cfg.optimizer.lr


@pytest.mark.parametrize("name", options("scheduler"))
def test_scheduler_configs_build_schedules(make_config, name):
    cfg = make_config("model=tiny", f"scheduler={name}")
    if name == "none":
        assert cfg.scheduler is None
        return
    assert cfg.scheduler.interval in ("step", "epoch")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = instantiate(cfg.scheduler)["builder"](optimizer, total_steps=100)
    for _ in range(100):
        optimizer.step()
        scheduler.step()
    assert 0 <= optimizer.param_groups[0]["lr"] <= 0.1 + 1e-12


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_configs_build_trainers(make_config, name):
    cfg = make_config("model=tiny", f"trainer={name}")
    if name == "fsdp":  # FSDP needs GPUs; its strategy object must still build
        strategy = instantiate(cfg.trainer.strategy)
        assert type(strategy).__name__ == "FSDPStrategy"
        return
    trainer = instantiate(cfg.trainer, accelerator="cpu", precision="32-true", logger=False)
    assert isinstance(trainer, L.Trainer)
    assert trainer.max_epochs == cfg.max_epochs


@pytest.mark.parametrize("name", options("callbacks"))
def test_callback_configs_build_callbacks(make_config, name):
    cfg = make_config("model=tiny", f"callbacks={name}")
    for key, callback in (cfg.callbacks or {}).items():
        assert isinstance(instantiate(callback), L.Callback), key


@pytest.mark.parametrize("name", options("logger"))
def test_logger_configs_build_loggers(make_config, name, tmp_path):
    from suite.train import build_loggers

    cfg = make_config("model=tiny", f"logger={name}")
    loggers = build_loggers(cfg)
    assert len(loggers) == len(cfg.logger or {})
    if name in ("wandb", "many"):
        assert (Path(cfg.paths.output_dir) / "wandb_run_id").is_file()


@pytest.mark.parametrize("task", TASKS)
def test_task_configs_instantiate_model_and_datamodule(make_config, task):
    cfg = make_config(f"model={task}")
    assert cfg.task_name == task
    assert cfg.monitor.mode in ("max", "min") and cfg.monitor.metric.startswith("val/")
    # datamodules/<task>, or the folder of the task it serves (legal_bert_mlm adapts legal_bert's encoder)
    folder = cfg.data._target_.split(".")[1]
    assert task == folder or task.startswith(f"{folder}_"), cfg.data._target_
    model = instantiate(cfg.model, optimizer=instantiate(cfg.optimizer),
                        scheduler=instantiate(cfg.scheduler) if cfg.scheduler else None)
    assert isinstance(model, L.LightningModule)
    assert isinstance(instantiate(cfg.data), L.LightningDataModule)
    for key, callback in (cfg.callbacks or {}).items():
        assert isinstance(instantiate(callback), L.Callback), key


@pytest.mark.parametrize("task", TASKS)
def test_model_choice_can_still_override_optimizer_and_data(make_config, task):
    cfg = make_config(f"model={task}", "optimizer=sgd", "scheduler=step")
    assert cfg.optimizer._target_ == "torch.optim.SGD"
    assert cfg.scheduler.builder._target_ == "suite.schedules.step"


@pytest.mark.parametrize("name", options("hparams_search"))
def test_optuna_searches_optimise_the_task_metric_in_its_direction(make_config, name):
    task = name.removesuffix("_optuna")
    cfg = make_config(f"model={task}", f"hparams_search={name}")
    sweeper = cfg.hydra.sweeper
    assert "optuna" in sweeper._target_.lower()
    assert cfg.optimized_metric == cfg.monitor.metric
    assert sweeper.direction == {"max": "maximize", "min": "minimize"}[cfg.monitor.mode]
    assert sweeper.params, "an Optuna search needs parameters"


@pytest.mark.parametrize("name", options("experiment"))
def test_experiments_compose(make_config, name):
    cfg = make_config(f"experiment={name}", "data.data_dir=/data/elsewhere")
    assert cfg.task_name in TASKS
    OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("name", [n for n in options("debug") if n != "default"])
def test_debug_configs_compose(make_config, name):
    cfg = make_config("model=tiny", f"debug={name}")
    assert cfg.num_workers == 0 and cfg.device == "cpu"


def test_wandb_sweep_files_drive_run_py_with_hydra_overrides():
    import yaml

    for path in sorted((CONF.parent / "sweeps" / "wandb").glob("*.yaml")):
        sweep = yaml.safe_load(path.read_text())
        assert sweep["program"] == "run.py", path
        assert "${args_no_hyphens}" in sweep["command"], path
        assert f"model={path.stem}" in sweep["command"], path
        assert sweep["metric"]["goal"] in ("maximize", "minimize"), path


def test_slurm_launcher_matches_tasks_to_devices(make_config):
    cfg = make_config("model=tiny", "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4")
    assert cfg.hydra.launcher.tasks_per_node == 4
    assert cfg.hydra.launcher.gpus_per_node == 4


def test_unknown_task_lists_valid_choices(make_config):
    with pytest.raises(ConfigCompositionException) as err:
        make_config("model=no_such_task")
    message = str(err.value) + str(err.value.__cause__)
    assert "no_such_task" in message and "Available options" in message and "tiny" in message


def test_unknown_key_is_named(make_config):
    with pytest.raises(ConfigCompositionException) as err:
        make_config("model=tiny", "trainer.max_epochz=3")
    assert "max_epochz" in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize("name", [n for n in options("experiment")
                                  if "suite.required:data.data_dir" in (CONF / "experiment" / f"{n}.yaml").read_text()])
def test_experiment_on_real_data_requires_its_path(make_config, name):
    """Never silently fall back to the task's generated default data."""
    from omegaconf.errors import InterpolationResolutionError

    cfg = make_config(f"experiment={name}")
    with pytest.raises(InterpolationResolutionError, match="data.data_dir is required"):
        OmegaConf.to_container(cfg.data, resolve=True)
    assert make_config(f"experiment={name}", "data.data_dir=/some/where").data.data_dir == "/some/where"
