"""The Hugging Face `Trainer` as legal_bert's peer in `python -m bench` (bench/harness.py calls `peer`
with the task prepared as its plain loop starts: config, datamodule set up, module, precision).

It trains the very module the suite trains (wrapped to return {'loss': ...}), on the datamodule's
tokenised training set, with the same batch size, precision, fused AdamW, learning rate, weight
decay and gradient clipping, the HF length-grouped sampler when the suite groups by length, and
HF's padding collator (to max_sequence_length when the profile pads every batch to it). Steps are
timed with the harness's `Windows`, so its numbers sit in the same table as the suite and the
plain loop. Needs the `accelerate` package; without it the row says so.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from common.timing import Windows

PEER_NAME = "HF Trainer"  # its row in the table


def peer(task_root: Path, prepared: tuple, w: Windows) -> dict:
    try:
        import accelerate  # noqa: F401
        from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments
    except ImportError as err:
        raise RuntimeError(f"Hugging Face Trainer unavailable ({err}); pip install accelerate") from err

    cfg, dm, model, precision = prepared
    # With compile on, the Trainer compiles the whole model its own way (torch_compile below); the
    # module's own compiled encoder inside that graph made dynamo fail ("already tracked for mutation").
    model.__dict__.pop("_compiled_encoder", None)
    dataset = dm.train_set
    batch_size = dm.per_device_batch_size
    fixed = dm.pad_to_multiple_of == dm.max_sequence_length

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(dataset)

        def __getitem__(self, i):
            item = dataset[i]
            return {"input_ids": item["input_ids"].tolist(), "labels": item["labels"].tolist()}

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, labels):
            return {"loss": self.inner.loss(self.inner(input_ids, attention_mask), labels)}

    class Timer(TrainerCallback):
        last_end = None

        def on_step_begin(self, args, state, control, **kw):
            between = time.perf_counter() - self.last_end if self.last_end else 0.0
            w.before_step(state.global_step, between)

        def on_step_end(self, args, state, control, **kw):
            w.after_step(state.global_step - 1, batch_size)
            self.last_end = time.perf_counter()

    collator = DataCollatorWithPadding(dm.tokenizer, padding="max_length" if fixed else True,
                                       max_length=dm.max_sequence_length if fixed else None,
                                       pad_to_multiple_of=None if fixed else dm.pad_to_multiple_of)
    args = TrainingArguments(
        output_dir=str(task_root / "hf"), per_device_train_batch_size=batch_size, max_steps=w.total_steps,
        learning_rate=float(cfg.optimizer.lr), weight_decay=float(cfg.optimizer.weight_decay),
        lr_scheduler_type="linear", warmup_steps=int(0.1 * w.total_steps),
        max_grad_norm=float(cfg.get("gradient_clip_val") or 0.0),
        bf16=precision.startswith("bf16"), fp16=precision.startswith("16"), use_cpu=w.device.type == "cpu",
        train_sampling_strategy="group_by_length" if dm.group_by_length else "random",
        dataloader_num_workers=int(cfg.num_workers), logging_steps=10**6, save_strategy="no", report_to=[],
        seed=int(cfg.seed), disable_tqdm=True, remove_unused_columns=False,
        torch_compile=model.compile_decision.on,  # as the suite decided for this module, not the setting's spelling
        optim="adamw_torch_fused" if cfg.optimizer.get("fused") else "adamw_torch",  # the suite's optimizer
    )
    if w.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    Trainer(model=Wrapped(model), args=args, train_dataset=Rows(), data_collator=collator, callbacks=[Timer()]).train()
    memory = {"peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30} if w.device.type == "cuda" else {}
    return {**w.summary(), **memory, "precision": precision}


QUALITY = [  # for `python -m bench.quality`
    {"name": "unfair_tos", "overrides": ["experiment=unfair_tos", "data.data_dir={data}/legal/claudette_ToS_50"],
     "metrics": ["test/micro_f1", "test/macro_f1"], "budgets": [4]},
]
