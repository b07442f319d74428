"""The method registry: the one place that says what an adaptation method is.

An entry names the method, its ``params.yaml`` section (a pydantic model, defined here so that
validating params never imports torch), the function that runs its stage, what it reads and
whether it can be attacked. The config (its sections, ``attack.models``), the stages and
``dvc.yaml``'s check, the CLI, the Prefect tasks, tracking, the report and the gate all read
``METHODS``; none of them spells a method's name.

Adding a method: its module (the stage body: train, evaluate, save), its section and entry here,
its section in ``params.yaml`` and its stage in ``dvc.yaml``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from itertools import product
from typing import Literal

from pydantic import Field, field_validator, model_validator

from transferlab.eps import Eps
from transferlab.layout import (
    FEATURES,
    IMAGES,
    MANIFEST,
    SPLIT,
    checkpoint_file,
    metrics_file,
    model_dir,
)
from transferlab.section import Section, Seed

# What a method's stage reads: the cached features, and/or the decoded images
Input = Literal["features", "images"]


@dataclass(frozen=True)
class Method:
    """One adaptation method.

    Attributes:
        name: the stage name, the ``params.yaml`` section and the folder under ``models/``.
        params: the pydantic model of its section.
        run: ``"module:function"``, the stage body ``(params, root) -> summary dict``; imported
            only when the stage runs.
        summary: one line for ``transferlab <name> --help``; details: the rest of it.
        reads: its inputs (decides its ``dvc.yaml`` deps and params sections).
        attackable: may be listed in ``attack.models`` (and is a dep of the attack stage).
        trains_backbone: its backbone leaves eval mode when training (BatchNorm, dropout);
            the frozen-backbone methods keep the ImageNet statistics.
        after: methods whose stored models its stage reads (``adv`` may start from ``full``).
    """

    name: str
    params: type[Section]
    run: str
    summary: str
    details: str = ""
    reads: tuple[Input, ...] = ("features",)
    attackable: bool = True
    trains_backbone: bool = False
    after: tuple[str, ...] = ()

    @property
    def model_dir(self) -> str:
        return model_dir(self.name)

    @property
    def metrics_file(self) -> str:
        return metrics_file(self.name)

    @property
    def checkpoint(self) -> str:
        return checkpoint_file(self.name)

    @property
    def deps(self) -> tuple[str, ...]:
        """The workspace files its stage reads (``dvc.yaml``'s deps)."""
        out: tuple[str, ...] = ()
        if "features" in self.reads:
            out += (FEATURES, SPLIT)
        if "images" in self.reads:
            out += tuple(p for p in (SPLIT, MANIFEST, IMAGES) if p not in out)
        return out + tuple(model_dir(m) for m in self.after)

    @property
    def sections(self) -> tuple[str, ...]:
        """The params sections its stage depends on (``dvc.yaml``'s params)."""
        return (*(("data",) if "images" in self.reads else ()), "features", self.name, "split")

    def stage(self) -> Callable[..., dict]:
        """The stage body, imported now."""
        module, _, attr = self.run.partition(":")
        return getattr(importlib.import_module(module), attr)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to ``METHODS``. Register before ``transferlab.config`` is imported: the
    ``Params`` model is built from the registry once."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered already")
    METHODS[method.name] = method
    return method


def attackable_methods() -> tuple[str, ...]:
    return tuple(m.name for m in METHODS.values() if m.attackable)


# ---------------------------------------------------------------- sections


class SvmParams(Section):
    """A linear SVM (liblinear) on the features (``classifiers/svm.py``)."""

    # one trial by default, like the other methods' empty search; params.yaml sets the grids
    C: tuple[float, ...] = (1.0,)
    cv: int = Field(3, ge=2, description="stratified folds for choosing C")
    class_weight: Literal["balanced"] | None = None
    max_iter: int = Field(10_000, ge=1)

    @field_validator("C")
    @classmethod
    def _positive(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(c <= 0 for c in v):
            raise ValueError("C must be a non-empty list of positive numbers")
        return v

    def trials(self) -> list[dict]:
        """The hyperparameter trials, chosen between on the validation split."""
        return [{"C": c} for c in self.C]


class TrainParams(Section):
    """What every gradient-trained method shares (the training loop, ``classifiers/loop.py``)."""

    head: Literal["linear", "mlp"] = "linear"
    hidden: int = Field(256, ge=1, description="MLP hidden units")
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    # SGD with momentum at a small lr is the seed's advice; rmsprop is allowed but warned about
    optimizer: Literal["sgd", "rmsprop"] = "sgd"
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(32, ge=1)
    patience: int = Field(5, ge=1, description="early stopping: epochs without val improvement")
    min_steps: int = Field(
        0, ge=0, description="more epochs when `epochs` passes take fewer optimiser steps"
    )
    augment: bool = False
    seed: Seed = 0
    # hyperparameter trials: every combination of these values of this section's keys, chosen
    # between on the validation split; {} is one trial, the section as written
    search: dict[str, tuple[float, ...]] = {}

    @model_validator(mode="after")
    def _search_keys(self):
        for key, values in self.search.items():
            if key == "search" or key not in type(self).model_fields:
                allowed = [k for k in type(self).model_fields if k != "search"]
                raise ValueError(f"search: unknown key {key!r}; allowed keys are {allowed}")
            if not values:
                raise ValueError(f"search.{key}: list at least one value")
            for v in values:  # each value must be valid for its key
                type(self).model_validate({**self.model_dump(exclude={"search"}), key: v})
        return self

    def trials(self) -> list[dict]:
        """The hyperparameter trials (the product of ``search``), chosen between on val."""
        keys = list(self.search)
        return [dict(zip(keys, combo, strict=True)) for combo in product(*self.search.values())]

    def with_trial(self, trial: dict):
        """This section with one trial's values (ints stay ints: ``epochs``)."""
        fields = type(self).model_fields
        return self.model_copy(
            update={k: int(v) if fields[k].annotation is int else v for k, v in trial.items()}
            | {"search": {}}
        )


class TopParams(TrainParams):
    """A new head on the frozen backbone (``classifiers/top.py``). Without augmentation it
    trains on the cached features (same result, far faster); with it, through the backbone."""


class DistributedParams(Section):
    """Data-parallel training (``classifiers/distributed.py``, docs/distributed.md). The weights
    do not depend on it: the same global batch and seed give the same model in 1 or N processes
    (within float rounding)."""

    processes: int = Field(
        1, ge=1, le=1024, description="ranks on this machine under torchrun (1: in-process)"
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="auto: nccl on CUDA GPUs, gloo on CPUs"
    )


class FullParams(TrainParams):
    """Full fine-tuning of backbone + head (``classifiers/full.py``)."""

    lr: float = Field(0.01, gt=0.0, description="head learning rate")
    backbone_lr_ratio: float = Field(0.1, gt=0.0, le=1.0, description="backbone lr = lr * this")
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(16, ge=1)
    patience: int = Field(3, ge=1)
    augment: bool = True
    warmup_epochs: float = Field(0.5, ge=0.0, description="linear warmup, then cosine decay")
    grad_clip: float | None = Field(1.0, gt=0.0)
    # epoch 0 trains the head only; each later epoch unfreezes one more backbone group (top down)
    gradual_unfreeze: bool = False
    unfreeze_groups: int = Field(4, ge=1)
    # keep BatchNorm statistics frozen: small batches make them noisy
    bn_train: bool = False
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU and AMX CPUs
    image_size: int | None = Field(128, ge=16, description="input px (null: the backbone's)")
    resume: bool = True
    # how many processes train, not what they learn: left out of checkpoints' identity, so a
    # run killed at one world size resumes at another
    distributed: DistributedParams = DistributedParams()


class AdvParams(FullParams):
    """Adversarial fine-tuning (``classifiers/adv.py``): PGD training (Madry) or TRADES."""

    init: Literal["full", "imagenet"] = Field(
        "full", description="start from models/full (cheap) or the ImageNet backbone"
    )
    scope: Literal["full", "top"] = Field("full", description="top: train the head only")
    loss: Literal["pgd", "trades"] = "pgd"
    beta: float = Field(6.0, ge=0.0, description="TRADES: weight of the robustness term")
    # 4/255: training above the 2/255 the report cares most about held 16-20/45 at 2/255
    # against 13/45 when training at 2/255 (docs/adv.md)
    eps: float = Field(4 / 255, gt=0.0, le=1.0, description="training L-inf budget (pixels)")
    steps: int = Field(3, ge=1, description="attack steps per batch")
    step_size: float | None = Field(None, gt=0.0, description="null: 2.5 * eps / steps")
    ramp_epochs: float = Field(1.0, ge=0.0, description="eps grows linearly over these")
    clean_mix: float = Field(0.0, ge=0.0, le=1.0, description="weight of the clean loss (pgd)")
    val_steps: int = Field(5, ge=1, description="PGD steps of the robust val accuracy")
    epochs: int = Field(20, ge=1)
    patience: int = Field(6, ge=1)

    @field_validator("eps", "step_size", mode="before")
    @classmethod
    def _eps(cls, v):
        return None if v is None else Eps.parse(v)


# ---------------------------------------------------------------- the methods

register(
    Method(
        name="svm",
        params=SvmParams,
        run="transferlab.classifiers.svm:run",
        summary="Linear SVM (liblinear) on the features, C by cross-validation: models/svm/.",
        details="Stored as backbone + one linear layer, so attacks reach it end to end.",
    )
)
register(
    Method(
        name="top",
        params=TopParams,
        run="transferlab.classifiers.top:run",
        summary="A new head on the frozen backbone (SGD, early stopping): models/top/.",
        details="Trains on the cached features, or through the backbone with top.augment (then "
        "it reads the images); the epoch bar shows the training loss and accuracy and the val "
        "accuracy.",
        reads=("features", "images"),
    )
)
register(
    Method(
        name="full",
        params=FullParams,
        run="transferlab.classifiers.full:run",
        summary="Full fine-tuning, checkpointed every epoch, resumable: models/full/.",
        details="Backbone and head train together (SGD, a smaller learning rate for the "
        "backbone, augmentation). An epoch bar and a batch bar show img/s and the running "
        "training loss and accuracy: training accuracy near 1 with val accuracy lagging means "
        "overfitting. While it runs, a checkpoint every epoch under .transferlab/checkpoints/, "
        "so a re-run after a kill resumes (full.resume) and deletes it at the end. "
        "full.distributed.processes > 1 trains data-parallel in that many torchrun processes, "
        "to the same weights (docs/distributed.md).",
        reads=("images",),
        trains_backbone=True,
    )
)
register(
    Method(
        name="adv",
        params=AdvParams,
        run="transferlab.classifiers.adv:run",
        summary="Adversarial fine-tuning (PGD or TRADES), robust-val model selection: models/adv/.",
        details="Trains on PGD adversarials crafted against the current weights every batch "
        "(adv.steps of them, eps ramped up over adv.ramp_epochs), from models/full (adv.init: "
        "full) or the ImageNet backbone; the kept epoch has the best PGD accuracy on the "
        "validation images. Checkpointed and resumable like full.",
        reads=("images",),
        after=("full",),
        trains_backbone=True,
    )
)
