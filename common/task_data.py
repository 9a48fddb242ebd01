"""What a task's module and callbacks learn from its data: one declared, frozen record.

A datamodule (datamodules.base.BaseDataModule) returns it from `task_data()` once it is set up; the
module receives it in `bind_data(data)` (lightning_modules.base.BaseTaskModule calls that from its
`setup`), and callbacks read `trainer.datamodule.task_data()`. Every field is optional: a task fills
what its module and callbacks read, and a reader that needs a field it finds empty says so. It lives
in common because datamodules, modules and callbacks are peers that never import each other.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class TaskData:
    """Fields, and who reads them:

    train_set            the training split as a Dataset: callbacks.fid trains its feature classifier and
                         draws reference images from it; clinical fits its ridge baseline on it
    val_set              the validation split: callbacks.forecast_plots and legal_bert's attention maps
                         draw their examples from it
    test_set_names       one name per test loader, in order: clinical logs `test/<name>/...` under each
    scaler               {"mean": [...], "std": [...]} per input channel, fitted on the training split:
                         clinical scales its inputs and targets with it
    label_names          the classes, in the order of the label tensors: legal_bert sizes its head and names
                         its per-class metrics with them; its ensemble checks the data has its labels
    multi_label          whether an example may have several labels (legal_bert: BCE vs cross-entropy)
    label_counts         training examples per label (a tensor): legal_bert's balanced class weights
    num_train_examples   size of the training split: legal_bert's balanced class weights
    tokenizer            the tokenizer the data was encoded with: legal_bert's attention maps show tokens
    class_names          the image classes (empty when unlabelled): diffusion conditions on them and names
                         its sample folders; callbacks.fid trains a class classifier when there are two or more
    image_size, channels the images' side and channels: diffusion refuses a model built for others
    padded_length        the one length every batch is padded to, or None where each batch has its own:
                         legal_bert compiles with CUDA graphs (static shapes) only with one length
    num_train_images     the training images (nerf's views; its examples are rays): nerf's hash-grid field
                         with per-image appearance vectors has one vector per image
    pixels_across_box    nerf: how many training pixels span the scene box at its centre (median over the
                         training views): the module compares the hash grid's finest cells with it at start,
                         and `finest_resolution: auto` sizes them from it
    validation_is_test   the validation data is the test data (the dataset has no separate split): the test
                         after fit scores the final weights, not the best checkpoint, which was chosen on it
    """

    train_set: Any = None
    val_set: Any = None
    test_set_names: tuple[str, ...] = ()
    scaler: Mapping[str, Sequence[float]] | None = None
    label_names: tuple[str, ...] | None = None
    multi_label: bool | None = None
    label_counts: Any = None
    num_train_examples: int | None = None
    tokenizer: Any = None
    class_names: tuple[str, ...] = ()
    image_size: int | None = None
    channels: int | None = None
    padded_length: int | None = None
    num_train_images: int | None = None
    pixels_across_box: float | None = None
    validation_is_test: bool = False

    def __post_init__(self) -> None:
        # names as tuples: the record is shared by module and callbacks, and none of them may change it
        object.__setattr__(self, "test_set_names", tuple(self.test_set_names))
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if self.label_names is not None:
            object.__setattr__(self, "label_names", tuple(self.label_names))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@runtime_checkable
class DeclaresTaskData(Protocol):
    """A datamodule that declares its TaskData (every datamodules.base.BaseDataModule does)."""

    def task_data(self) -> TaskData: ...


def task_data_of(datamodule: Any) -> TaskData:
    """`datamodule.task_data()`, or a TypeError saying what the suite expects instead."""
    if not isinstance(datamodule, DeclaresTaskData):
        raise TypeError(f"{type(datamodule).__name__} is not a suite datamodule: derive it from "
                        "datamodules.base.BaseDataModule, whose task_data() tells the module and callbacks "
                        "about the data (see docs/ADDING_A_TASK.md)")
    data = datamodule.task_data()
    if not isinstance(data, TaskData):
        raise TypeError(f"{type(datamodule).__name__}.task_data() returned {type(data).__name__}, not a TaskData")
    return data
