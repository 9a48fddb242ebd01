"""Sample quality of a generative model: FID / KID, or their classifier-feature stand-ins, and
conditioning accuracy.

Every `every_n_epochs` validation epochs (and on test) the callback asks the module for samples
(`pl_module.sample(labels=..., seed=...)`, images in [-1, 1]) and compares them with the real
held-out images seen in that loop, through torchmetrics' FrechetInceptionDistance and
KernelInceptionDistance:

* `val/fid`, `val/kid`: true FID/KID with the standard Inception weights, only when that file is
  on disk (`inception_weights`, or torch hub's cache `checkpoints/weights-inception-2015-12-05-6726825d.pth`)
  and torch-fidelity is installed. Offline neither is usually true; the callback says so once.
* `val/fd_classifier`, `val/kid_classifier`: always. The same distances in the 4*width-dimensional
  pooled features of a small CNN that the callback trains on the training images (class labels,
  or rotation prediction when the data has none). Not comparable with published FIDs.
* `val/fd_classifier_train_ref`: that distance for real training images vs the held-out ones (as
  many as samples): what a perfect generator would score; `val/fd_classifier_ratio` = fd / ref.
* `val/cond_accuracy`: share of class-conditional samples the classifier assigns to their class;
  `val/classifier_accuracy`: the classifier's accuracy on the held-out real images.
* `also_guidance: [1.0, {scale: 2.0, interval: [0, 999]}]` scores the same starting noise again
  under each of those guidance settings: a number is a scale (with the model's guidance
  interval), a mapping names the timesteps to guide too. Their metrics carry a suffix,
  `val/fd_classifier_g1`, `val/cond_accuracy_g2_t0-999`, ...: guidance buys conditioning at the
  cost of diversity, which FD charges for, so one evaluation shows the whole trade.

The classifier is trained once per dataset and settings (seeded, under its own RNG) and cached in
the suite's data cache (`cache_dir`), kept in this callback's state_dict (so checkpoints carry it)
and read back from the checkpoint when one is evaluated. Under fast_dev_run a `quick_check_steps`
classifier is trained instead and not cached: that run only checks that scoring works.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from callbacks.sample_classifier import (  # noqa: F401  (ClassifierFeatures, ... are used by importers too)
    ClassifierFeatures,
    SmallClassifier,
    cached_classifier,
    collect,
    rotation_batch,
    train_classifier,
)
from common.parallel import skipped_when_sharded
from common.task_data import task_data_of

log = logging.getLogger(__name__)

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


# ---- Inception (true FID) ------------------------------------------------------------------------
def find_inception_weights(configured: str | None) -> tuple[Path | None, str]:
    """The Inception weights file to use and, when there is none usable, why."""
    candidates = []
    if configured:
        candidates.append(Path(str(configured)).expanduser())
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE)
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        where = " or ".join(str(p) for p in candidates)
        return None, f"no Inception weights file at {where}"
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return None, f"Inception weights found at {found} but torch-fidelity (needed by torchmetrics' FID) is not installed"
    return found, ""


class InceptionUint8(nn.Module):
    """Images in [-1, 1] (1 or 3 channels) -> uint8 RGB -> torchmetrics' Inception features."""

    def __init__(self, inception: nn.Module) -> None:
        super().__init__()
        self.inception = inception
        self.num_features = 2048

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.inception(((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))


def guidance_settings(entries: list | None) -> dict[str, tuple[float, list[int] | None]]:
    """`also_guidance` entries -> {metric suffix: (scale, interval)}: 1.0 -> "_g1" (the model's
    interval), {scale: 2, interval: [0, 400]} -> "_g2_t0-400"."""
    settings: dict[str, tuple[float, list[int] | None]] = {}
    for entry in entries or []:
        if isinstance(entry, (int, float)) and not isinstance(entry, bool):
            scale, interval = float(entry), None
        elif hasattr(entry, "keys") and "scale" in entry and set(entry.keys()) <= {"scale", "interval"}:
            scale, interval = float(entry["scale"]), entry.get("interval")
            if interval is not None:
                interval = [int(t) for t in interval]
                if len(interval) != 2:
                    raise ValueError(f"callbacks.sample_quality.also_guidance: {entry}: interval must be [lo, hi] timesteps")
        else:
            raise ValueError(f"callbacks.sample_quality.also_guidance: {entry!r}: expected a guidance scale or "
                             "{scale: S, interval: [lo, hi]}")
        suffix = f"_g{scale:g}" + (f"_t{interval[0]}-{interval[1]}" if interval else "")
        settings[suffix] = (scale, interval)
    return settings


# ---- the callback --------------------------------------------------------------------------------
class SampleQuality(L.Callback):
    def __init__(
        self,
        every_n_epochs: int = 1,
        max_samples: int | None = 2000,
        batch_size: int = 500,
        guidance_scale: float | None = None,
        also_guidance: list[float | dict] | None = None,
        num_inference_steps: int | None = None,
        seed: int = 1234,
        inception_weights: str | None = None,
        classifier_steps: int = 200,
        classifier_width: int = 16,
        classifier_lr: float = 5e-3,
        classifier_batch_size: int = 128,
        classifier_max_images: int | None = 20000,
        kid_subset_size: int = 1000,
        kid_subsets: int = 50,
        train_reference: bool = True,
        cache_dir: str | None = None,
        quick_check_steps: int = 10,
    ) -> None:
        self.every_n_epochs = max(1, int(every_n_epochs))
        self.max_samples = max_samples
        self.batch_size = int(batch_size)
        self.guidance_scale = guidance_scale
        # metric-name suffix -> (guidance scale, interval or None for the model's), e.g. {"_g1": (1.0, None)}
        self.also_guidance = guidance_settings(also_guidance)
        self.num_inference_steps = num_inference_steps
        self.seed = int(seed)
        self.inception_weights = inception_weights
        self.classifier_cfg = {"steps": classifier_steps, "width": classifier_width, "lr": classifier_lr,
                               "batch_size": classifier_batch_size}
        self.classifier_max_images = classifier_max_images
        self.kid_subset_size = int(kid_subset_size)
        self.kid_subsets = int(kid_subsets)
        self.train_reference = train_reference
        self.cache_dir = cache_dir
        self.quick_check_steps = int(quick_check_steps)
        self.classifier: SmallClassifier | None = None
        self.classifier_meta: dict[str, Any] | None = None
        self._pending_state: dict[str, Any] | None = None
        self._inception_checked = False
        self._inception_path: Path | None = None
        self._metrics: dict[str, Any] = {}
        self._reference: dict[str, float] = {}
        self._active = False
        self._real_seen = 0

    @property
    def state_key(self) -> str:
        return "SampleQuality"

    # ---- feature networks ------------------------------------------------------------------------
    def _check_inception(self) -> None:
        if self._inception_checked:
            return
        self._inception_checked = True
        self._inception_path, why = find_inception_weights(self.inception_weights)
        if self._inception_path is None:
            from lightning.pytorch.utilities.rank_zero import rank_zero_info

            rank_zero_info(f"Sample quality: {why}, so no true FID/KID is computed. Reporting instead the Fréchet "
                           "distance and KID in the features of a small classifier trained on this dataset "
                           "(val/fd_classifier, val/kid_classifier); these are not FID and not comparable with "
                           "published FIDs.")

    def _ensure_classifier(self, trainer, pl_module) -> None:
        if self.classifier is not None:
            return
        if self._pending_state is None and trainer.state.fn != TrainerFn.FITTING and trainer.ckpt_path:
            checkpoint = torch.load(trainer.ckpt_path, map_location="cpu", weights_only=True, mmap=True)
            self._pending_state = (checkpoint.get("callbacks") or {}).get(self.state_key)
        state = self._pending_state
        if state and state.get("classifier"):
            meta = state["meta"]
            model = SmallClassifier(meta["channels"], meta["num_outputs"], meta["width"])
            model.load_state_dict(state["classifier"])
            self.classifier, self.classifier_meta = model.eval(), meta
            self._pending_state = None
            return
        data = task_data_of(trainer.datamodule) if trainer.datamodule is not None else None
        if data is None or data.train_set is None:
            raise RuntimeError("SampleQuality trains its feature classifier on the data's train_set (TaskData), "
                               "which is missing")
        images, labels = collect(data.train_set, self.classifier_max_images, self.seed)
        num_classes = data.num_classes
        if labels is not None and (labels < 0).all():
            labels = None
        cfg = dict(self.classifier_cfg)
        what = "class labels" if labels is not None and num_classes > 1 else "rotation prediction"
        if trainer.fast_dev_run:  # a quick check asks whether scoring runs, not for a judge worth caching
            cfg["steps"] = min(cfg["steps"], self.quick_check_steps)
            log.info("fast_dev_run: a %d-step sample-quality classifier (%s); its scores only show that scoring "
                     "runs", cfg["steps"], what)
            self.classifier = train_classifier(images, labels, num_classes, pl_module.device, seed=self.seed, **cfg)
        else:
            log.info("Sample-quality classifier: %d images (%s, %d steps)", len(images), what, cfg["steps"])
            self.classifier = cached_classifier(self.cache_dir, images, labels, num_classes, pl_module.device,
                                                seed=self.seed, **cfg)
        rotation = labels is None or num_classes < 2
        self.classifier_meta = {"channels": images.shape[1], "num_outputs": 4 if rotation else num_classes,
                                "width": cfg["width"], "rotation": rotation}

    def _build_metrics(self, pl_module) -> None:
        from torchmetrics.classification import MulticlassAccuracy
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        device = pl_module.device
        self.classifier.to(device)
        feats = ClassifierFeatures(self.classifier)
        m: dict[str, Any] = {"ref": FrechetInceptionDistance(feature=feats, reset_real_features=True)}
        for suffix in ["", *self.also_guidance]:  # one set of sample metrics per guidance setting
            m["fd_classifier" + suffix] = FrechetInceptionDistance(feature=feats, reset_real_features=True)
            m["kid_classifier" + suffix] = KernelInceptionDistance(feature=feats, subsets=self.kid_subsets,
                                                                   subset_size=self.kid_subset_size,
                                                                   reset_real_features=True)
            if not self.classifier_meta["rotation"]:
                m["cond_accuracy" + suffix] = MulticlassAccuracy(num_classes=self.classifier_meta["num_outputs"],
                                                                 average="micro")
        if not self.classifier_meta["rotation"]:
            m["classifier_accuracy"] = MulticlassAccuracy(num_classes=self.classifier_meta["num_outputs"],
                                                          average="micro")
        if self._inception_path is not None:
            fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(self._inception_path))
            m["fid"] = fid
            m["kid"] = KernelInceptionDistance(feature=InceptionUint8(fid.inception), subsets=self.kid_subsets,
                                               subset_size=self.kid_subset_size)
            fid.inception = InceptionUint8(fid.inception)
        self._metrics = {k: v.to(device) for k, v in m.items()}

    # ---- when ------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        # a bad extra setting fails now, not at the first evaluation an epoch into training
        check = getattr(pl_module, "check_sampling", None)
        for _scale, interval in self.also_guidance.values():
            if check is not None and interval is not None:
                check(guidance_interval=interval, key="callbacks.sample_quality.also_guidance interval")

    def _due(self, trainer) -> bool:
        if trainer.sanity_checking:
            return False
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch + 1 >= trainer.max_epochs
        return epoch == 0 or (epoch + 1) % self.every_n_epochs == 0 or last or bool(trainer.fast_dev_run)

    def _start(self, trainer, pl_module, prefix: str) -> None:
        self._active = True
        self._check_inception()
        self._ensure_classifier(trainer, pl_module)
        if not self._metrics:
            self._build_metrics(pl_module)
        for metric in self._metrics.values():
            metric.reset()
        self._real_seen = 0
        self._need_ref = self.train_reference and prefix not in self._reference

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._active = False
        if self._due(trainer) and self._can_sample(trainer):
            self._start(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._active = False
        if self._can_sample(trainer):
            self._start(trainer, pl_module, "test")

    def _can_sample(self, trainer) -> bool:
        # outside a step no rank holds whole weights, so sampling from a hook cannot run
        return not skipped_when_sharded(trainer, "Sample quality", "Score a checkpoint on one device: "
                                        "mode=test ckpt_path=...")

    # ---- real images -----------------------------------------------------------------------------
    @torch.no_grad()
    def _real(self, pl_module, batch) -> None:
        if not self._active:
            return
        x, y = batch[0], batch[1]
        m = self._metrics
        x = x.to(pl_module.device)
        for key in self._real_keys():
            m[key].update(x, real=True)
        if self._need_ref:
            m["ref"].update(x, real=True)
        if "classifier_accuracy" in m and (y >= 0).all():
            m["classifier_accuracy"].update(self.classifier(x.float()).argmax(1), y.to(pl_module.device))
        self._real_seen += len(x)

    def _real_keys(self) -> list[str]:
        keys = ["fid", "kid"] + [k + s for s in ["", *self.also_guidance] for k in ("fd_classifier", "kid_classifier")]
        return [k for k in keys if k in self._metrics]

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._real(pl_module, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._real(pl_module, batch)

    # ---- samples and scores ----------------------------------------------------------------------
    def _labels(self, pl_module, n: int) -> torch.Tensor:
        k = int(getattr(pl_module, "num_classes", 0) or 0)
        return torch.arange(n) % k if k else torch.full((n,), -1)

    @torch.no_grad()
    def _finish(self, trainer, pl_module, prefix: str) -> dict[str, float]:
        if not self._active:
            return {}
        self._active = False
        m = self._metrics
        world, rank = trainer.world_size, trainer.global_rank
        real_total = int(trainer.strategy.reduce(torch.tensor(float(self._real_seen), device=pl_module.device),
                                                 reduce_op="sum").item())
        n = real_total if self.max_samples is None else min(real_total, int(self.max_samples))
        if n < 2:
            log.warning("Sample quality needs at least 2 held-out images, saw %d; skipping", real_total)
            return {}
        labels = self._labels(pl_module, n)
        chunks = list(torch.split(labels, self.batch_size))
        conditional = bool(int(getattr(pl_module, "num_classes", 0) or 0))
        results: dict[str, float] = {}
        for suffix, (scale, interval) in [("", (self.guidance_scale, None)), *self.also_guidance.items()]:
            extra = ("fid", "kid") if suffix == "" else ()  # Inception scores only the model's own guidance
            keys = [k for k in ("fd_classifier" + suffix, "kid_classifier" + suffix, *extra) if k in m]
            cond = m.get("cond_accuracy" + suffix) if conditional else None
            for i in range(rank, len(chunks), world):  # the same seeds for every scale: paired samples
                images = pl_module.sample(labels=chunks[i], seed=self.seed + i, guidance_scale=scale,
                                          guidance_interval=interval, num_inference_steps=self.num_inference_steps)
                for key in keys:
                    m[key].update(images, real=False)
                if cond is not None:
                    cond.update(self.classifier(images.float()).argmax(1), chunks[i].to(images.device))
            with torch.random.fork_rng(devices=[pl_module.device] if pl_module.device.type == "cuda" else []):
                torch.manual_seed(self.seed)
                for key in keys:
                    if key.startswith("kid"):
                        real_n = sum(len(f) for f in m[key].real_features)
                        fake_n = sum(len(f) for f in m[key].fake_features)
                        m[key].subset_size = max(2, min(self.kid_subset_size, real_total, n, real_n * world,
                                                        fake_n * world))
                        results[key] = float(m[key].compute()[0])
                    else:
                        results[key] = float(m[key].compute())
            if cond is not None:
                results["cond_accuracy" + suffix] = float(cond.compute())
        if "classifier_accuracy" in m and m["classifier_accuracy"].update_called:
            results["classifier_accuracy"] = float(m["classifier_accuracy"].compute())
        if self._need_ref:
            x, _ = collect(task_data_of(trainer.datamodule).train_set, n, self.seed + 1)
            for i in range(rank, math.ceil(len(x) / self.batch_size), world):
                m["ref"].update(x[i * self.batch_size:(i + 1) * self.batch_size].to(pl_module.device), real=False)
            self._reference[prefix] = float(m["ref"].compute())
            self._need_ref = False
        if prefix in self._reference:
            ref = self._reference[prefix]
            results["fd_classifier_train_ref"] = ref
            for suffix in ["", *self.also_guidance]:
                results["fd_classifier_ratio" + suffix] = results["fd_classifier" + suffix] / max(ref, 1e-12)
        for key, value in results.items():
            pl_module.log(f"{prefix}/{key}", value, prog_bar=key in ("fd_classifier", "cond_accuracy"), sync_dist=False)
        return results

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module, "test")

    # ---- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.classifier is None:
            return {}
        return {"classifier": {k: v.detach().cpu() for k, v in self.classifier.state_dict().items()},
                "meta": dict(self.classifier_meta)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("classifier"):
            self._pending_state = state_dict
            self.classifier = None
            self._metrics = {}
