"""Typed, validated view of ``params.yaml``.

``load_params`` is the only reader of the YAML. Each top-level section is one frozen pydantic
model with ``extra="forbid"``, so a typo fails loudly with the key path, the file and the
allowed keys or values, before any work starts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from transferlab.eps import Eps, EpsField
from transferlab.methods import (  # noqa: F401  (re-exported: the sections' old home)
    METHODS,
    FullParams,
    SvmParams,
    TopParams,
    TrainParams,
    attackable_methods,
)
from transferlab.names import UnsafeName, data_name, data_path, metric_key
from transferlab.redact import redact, url_credentials
from transferlab.section import MAX_INT, Section, Seed  # noqa: F401  (MAX_INT: re-exported)

DEFAULT_PARAMS = Path("params.yaml")
# A params file is a few KB; these bounds stop a hostile one (a huge file, or a "billion laughs"
# of nested YAML aliases that expands a 1 KB file into gigabytes) before it costs memory.
MAX_PARAMS_BYTES = 1 << 20
MAX_PARAMS_NODES = 100_000


class ParamsError(ValueError):
    """A params file that cannot be used; the message is one line naming key, file and fix."""


def _no_credentials(url: str | None) -> str | None:
    """Refuse secrets in a URL: params are logged, stored by MLflow and copied into dvc.lock."""
    if url is not None and (what := url_credentials(url)):
        raise ValueError(
            f"the URL holds {what}; params are logged and stored, so put credentials in the "
            "environment or configuration instead (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, ~/.aws/credentials, MLFLOW_TRACKING_USERNAME/PASSWORD, ~/.netrc)"
        )
    return url


def _data_names(v: tuple[str, ...], what: str) -> tuple[str, ...]:
    """Class names given in params: the same rule as names found in data (names.data_name)."""
    try:
        out = tuple(data_name(n) for n in v)
    except UnsafeName as exc:
        raise ValueError(f"{what} {exc}") from None
    if len(set(out)) != len(out):
        raise ValueError(f"{what} must not repeat")
    return out


def parse_eps(value: Any) -> Eps:
    """``4/255``, ``"0.03"`` or ``0.03`` as an ``Eps`` in [0, 1] (see ``transferlab.eps``)."""
    return Eps.parse(value)


# ---------------------------------------------------------------- data


class FolderSource(Section):
    """Images in ``path/<class>/...``: the first-level subfolder is the class."""

    kind: Literal["folder"] = "folder"
    path: Path


TUXPAINT_CLASSES: dict[str, tuple[str, ...]] = {
    "mammals": ("animals/mammals",),
    "birds": ("animals/birds",),
    "fruit_vegetables": ("food/fruit", "food/vegetables"),
    "flowers": ("plants/flowers",),
    "fish": ("animals/fish",),
}


class TuxpaintSource(Section):
    """Photo stamps shipped by Debian's ``tuxpaint-stamps-default`` (the bundled default)."""

    kind: Literal["tuxpaint_photos"] = "tuxpaint_photos"
    path: Path = Path("/usr/share/tuxpaint/stamps")
    classes: dict[str, tuple[str, ...]] = Field(
        default_factory=lambda: dict(TUXPAINT_CLASSES), min_length=2
    )

    @field_validator("classes")
    @classmethod
    def _class_folders(cls, v: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        out: dict[str, tuple[str, ...]] = {}
        for label, folders in v.items():
            (name,) = _data_names((label,), "class name")
            if not folders:
                raise ValueError(f"class {name!r} lists no folder; name at least one")
            try:
                out[name] = tuple(data_path(f).as_posix() for f in folders)
            except UnsafeName as exc:
                raise ValueError(f"class {name!r}: folder {exc}") from None
        return out


# Sources that are not a local folder still have a `path`: dvc.yaml's pull stage depends on
# `${data.source.path}`. For files on this machine it is their location; for downloads it is
# the cache folder they land in, so DVC sees the bytes that were pulled. The default, downloads/,
# is in git (empty but for its .gitignore) because DVC refuses to run a stage whose dep is missing.
DOWNLOADS = Path("downloads")


class ManifestSource(Section):
    """A CSV (``path,label`` header) or JSON list of ``{"path": ..., "label": ...}`` objects.

    Paths are relative to the manifest file's folder.
    """

    kind: Literal["manifest"] = "manifest"
    path: Path


class IdxSource(Section):
    """IDX files of the MNIST family (Fashion-MNIST, MNIST, KMNIST, EMNIST), gzip or raw.

    ``path`` is the folder holding ``<split>-images-idx3-ubyte[.gz]`` and
    ``<split>-labels-idx1-ubyte[.gz]``; the images are written as PNG into the dataset.
    """

    kind: Literal["idx"] = "idx"
    path: Path
    splits: tuple[str, ...] = Field(("train", "t10k"), min_length=1)
    # label index -> class name; digits when empty
    classes: tuple[str, ...] = ()
    per_class: int | None = Field(None, ge=1, description="keep at most this many per class")

    @field_validator("classes")
    @classmethod
    def _class_names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _data_names(v, "class name")

    @field_validator("splits")
    @classmethod
    def _splits(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _data_names(v, "split name")


class HttpSource(Section):
    """A .tar.gz, .tgz, .tar or .zip archive of ``<class>/<image>`` folders over HTTP(S)."""

    kind: Literal["http"] = "http"
    url: str = Field(pattern=r"^https?://")
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$", description="required: checks the bytes")
    path: Path = DOWNLOADS
    # folder inside the archive whose subfolders are the classes ("" = the archive's root, or
    # its only top-level folder)
    root: str = ""
    retries: int = Field(5, ge=0, le=100)
    timeout: float = Field(30.0, gt=0)

    _url = field_validator("url")(classmethod(lambda cls, v: _no_credentials(v)))

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        try:
            return data_path(v.strip("/")).as_posix() if v.strip("/") else ""
        except UnsafeName as exc:
            raise ValueError(f"a folder inside the archive: {exc}") from None


class S3Source(Section):
    """``s3://bucket/prefix/<class>/...``: the next prefix level is the class.

    Credentials come from the standard AWS chain (environment, profile, instance role), never
    from params.
    """

    kind: Literal["s3"] = "s3"
    url: str = Field(pattern=r"^s3://[^/]+")
    endpoint_url: str | None = None
    region: str | None = None
    path: Path = DOWNLOADS
    # 10, like aws s3 sync's max_concurrent_requests: more threads only add GIL contention
    workers: int = Field(10, ge=1, le=256, description="parallel downloads")
    retries: int = Field(4, ge=0, le=100)
    timeout: float = Field(10.0, gt=0)

    _urls = field_validator("url", "endpoint_url")(classmethod(lambda cls, v: _no_credentials(v)))


TORCHVISION_DATASETS = (
    "CIFAR10",
    "CIFAR100",
    "FashionMNIST",
    "MNIST",
    "Flowers102",
    "OxfordIIITPet",
    "Food101",
    "Caltech101",
    "DTD",
    "EuroSAT",
    "STL10",
    "SVHN",
)


class TorchvisionSource(Section):
    """A torchvision dataset by name, fetched by its own downloader into ``path``."""

    kind: Literal["torchvision"] = "torchvision"
    name: Literal[TORCHVISION_DATASETS]  # type: ignore[valid-type]
    path: Path = DOWNLOADS
    # the dataset's own split names: train/test (CIFAR, MNIST), train/val/test (Flowers102,
    # DTD), trainval/test (OxfordIIITPet); ignored by the datasets without splits
    split: str = "train"
    download: bool = True
    per_class: int | None = Field(None, ge=1, description="keep at most this many per class")


FASHION_MNIST_CLASSES = (
    "T-shirt_top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class FashionMnistSource(Section):
    """Debian's ``dataset-fashion-mnist``; torchvision's downloader into ``cache`` without it."""

    kind: Literal["fashion_mnist"] = "fashion_mnist"
    path: Path = Path("/usr/share/datasets/fashion-mnist")
    cache: Path = DOWNLOADS
    splits: tuple[Literal["train", "t10k"], ...] = Field(("train", "t10k"), min_length=1)
    per_class: int | None = Field(None, ge=1, description="keep at most this many per class")


Source = Annotated[
    FolderSource
    | TuxpaintSource
    | ManifestSource
    | IdxSource
    | HttpSource
    | S3Source
    | TorchvisionSource
    | FashionMnistSource,
    Field(discriminator="kind"),
]


class DataParams(Section):
    source: Source = Field(default_factory=TuxpaintSource)
    # Judged by pixel count, not the shorter side: a 400x30 banner (12,000 pixels) is a usable
    # photo, and the backbone resizes every image anyway.
    min_size: int = Field(
        32, ge=1, description="reject images with fewer pixels than min_size x min_size"
    )
    max_pixels: int = Field(
        64_000_000, ge=1, description="reject larger images (decompression bombs)"
    )
    # Checked before a file is read: an 8 GB sparse "x.jpg" is one rejected file, not a
    # MemoryError for the whole pull. 256 MB is far above any camera's JPEG or PNG.
    max_bytes: int = Field(256_000_000, ge=1, description="reject larger image files")
    background: tuple[int, int, int] = (255, 255, 255)

    @field_validator("background")
    @classmethod
    def _rgb(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if not all(0 <= c <= 255 for c in v):
            raise ValueError("background must be three integers in 0..255")
        return v


class SplitParams(Section):
    seed: Seed = 0
    val: float = Field(0.2, ge=0.0, lt=1.0)
    test: float = Field(0.25, gt=0.0, lt=1.0)
    per_class: int | None = Field(None, ge=1, description="cap images per class")
    # few-shot: train on N images per class (nested: the 5 shots include the 2 shots of the
    # same seed); val and test stay exactly as without shots, so runs compare
    shots: int | None = Field(None, ge=1, description="training images per class")

    @model_validator(mode="after")
    def _room_for_train(self) -> SplitParams:
        if self.val + self.test >= 1.0:
            raise ValueError(
                f"split.val + split.test = {self.val + self.test:g} leaves nothing to train on; "
                "keep their sum below 1 (e.g. val: 0.2, test: 0.25)"
            )
        return self


# ---------------------------------------------------------------- features


class FeaturesParams(Section):
    backbone: str = "efficientnet_lite0"
    # package: weights a pip package ships; hub: timm/torchvision download; file:<path>; none
    pretrained: str = "package"
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = 16
    num_workers: int = Field(0, ge=0)
    # auto: bf16 autocast where the hardware computes it natively and a probe on the real
    # images finds it faster and in agreement with fp32 (transferlab.features.resolve_precision)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    cache_dir: Path = Path(".transferlab/cache")
    # one transform for every method that reads features (svm, top), fitted on train; auto:
    # the best on the validation split (transferlab.classifiers.prep)
    preprocess: Literal["auto", "none", "standardize", "l2"] = "auto"
    compile: bool = Field(False, description="torch.compile the backbone for large extractions")
    checkpoint_every: int = Field(
        4096,
        ge=1,
        description="images per cache shard while extracting: a killed run keeps the finished "
        "ones (one shard per run with compile, which would recompile per chunk)",
    )

    @field_validator("pretrained")
    @classmethod
    def _pretrained(cls, v: str) -> str:
        if v in ("package", "hub", "none") or (v.startswith("file:") and len(v) > 5):
            return v
        raise ValueError("pretrained must be one of: package, hub, none, file:<path>")

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        from transferlab.backbone_specs import check_backbone_name

        check_backbone_name(v)
        return v


class LearningCurveParams(Section):
    """``transferlab experiment learning-curve``: every method on the same nested subsets of
    Fashion-MNIST (Debian ``dataset-fashion-mnist`` IDX files), one held-out test set, intervals
    over seeds and test images (``docs/learning_curve/summary.md``)."""

    idx_dir: Path = Path("/usr/share/datasets/fashion-mnist")
    # ordered as the lecture ranks them, from the few-images winner to the many-images winner
    methods: tuple[str, ...] = Field(("svm", "top", "full"), min_length=1)
    n_per_class: tuple[Annotated[int, Field(ge=1)], ...] = Field(
        (1, 5, 10, 20, 100, 1000), min_length=1
    )
    # methods that train the backbone are slow on a CPU: their own (smaller) grid and seeds
    backbone_n_per_class: tuple[Annotated[int, Field(ge=1)], ...] = (10,)
    seeds: tuple[Seed, ...] = Field((0, 1), min_length=1)
    backbone_seeds: tuple[Seed, ...] | None = Field(
        None, min_length=1, description="null: all seeds"
    )
    # per method, keys that replace its params.yaml section for this experiment only
    method_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("method_overrides")
    @classmethod
    def _overrides(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        # checked here, so a typo fails when params.yaml is read, not an hour into the run
        for name, over in v.items():
            if name not in METHODS:
                raise ValueError(
                    f"method_overrides: unknown method {name!r}; allowed: {', '.join(METHODS)}"
                )
            METHODS[name].params.model_validate(over)
        return v

    test_per_class: int = Field(100, ge=1)
    val_per_class: int = Field(10, ge=1, description="per seed, for early stopping")
    pool_per_class: int = Field(1500, ge=2, description="each seed draws its subsets from it")
    image_size: int = Field(96, ge=16)
    precision: Literal["fp32", "bf16"] = "bf16"  # feature extraction of the pool and test set
    min_epoch_images: int = Field(
        128, ge=1, description="tiny training sets are repeated to this many images per epoch"
    )
    out_dir: Path = Path("docs/learning_curve")


class ActiveLearningParams(Section):
    """``transferlab experiment active-learning``: simulated labelling rounds per query strategy
    (``transferlab.active``), scored on a test set that never enters the pool."""

    datasets: tuple[Literal["fashion_mnist", "photos"], ...] = ("fashion_mnist", "photos")
    idx_dir: Path = Path("/usr/share/datasets/fashion-mnist")
    pool_per_class: int = Field(300, ge=1, description="Fashion-MNIST pool (train files)")
    test_per_class: int = Field(100, ge=1, description="Fashion-MNIST test set (t10k files)")
    image_size: int = Field(64, ge=16)
    strategies: tuple[str, ...] = (
        "random",
        "least_confidence",
        "margin",
        "entropy",
        "kcenter",
        "badge",
    )
    learners: tuple[Literal["svm", "top"], ...] = ("svm", "top")
    seeds: tuple[int, ...] = (0, 1, 2)
    seed_per_class: int = Field(2, ge=1, description="labels per class before the first round")
    batch: int = Field(80, ge=1, description="labels per round (Fashion-MNIST)")
    photos_batch: int = Field(10, ge=1, description="labels per round (the photos)")
    budget: int = Field(500, ge=2, description="labels at the end")
    target: float = Field(0.95, gt=0.0, le=1.0, description="fraction of full-pool accuracy")
    top_epochs: int = Field(30, ge=1)
    # one C for every round: svm.C's grid by CV would cost 13 liblinear fits per round
    svm_C: float = Field(0.01, gt=0.0, description="the SVM's C in every round")
    out_dir: Path = Path("docs/active_learning")

    @field_validator("strategies")
    @classmethod
    def _known_strategies(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from transferlab.active.strategies import STRATEGIES

        unknown = [s for s in v if s not in STRATEGIES]
        if unknown or not v:
            raise ValueError(f"unknown strategies {unknown}; choose from: {', '.join(STRATEGIES)}")
        return v


class NewClassParams(Section):
    """``transferlab experiment new-class``: the cost of adding a category the models never saw
    (``transferlab.active.new_class``)."""

    name: str = "vehicles"
    path: Path = Path("/usr/share/tuxpaint/stamps/vehicles")
    counts: tuple[Annotated[int, Field(ge=1)], ...] = (1, 2, 5, 10)
    seeds: tuple[int, ...] = (0, 1, 2)
    test_max: int = Field(40, ge=1, description="held-out new-class test images (at most)")
    # methods from the registry: those on the frozen backbone retrain on the cached features;
    # those that fine-tune their backbone (full, adv) follow `fine_tuned`
    learners: tuple[str, ...] = ("svm", "top", "full", "adv")
    fine_tuned: Literal["extend", "retrain"] = Field(
        "extend",
        description="extend: models/<method>'s head gains a row (the class's mean feature), then "
        "the head alone trains extend_epochs; retrain: the method's own stage on the grown data",
    )
    extend_epochs: int = Field(10, ge=1, description="head-only epochs after extending a head")
    out_dir: Path = Path("docs/new_class")

    @field_validator("learners")
    @classmethod
    def _registered(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [m for m in v if m not in METHODS]
        if unknown or not v:
            raise ValueError(
                f"learners must list methods of the registry ({', '.join(METHODS)}); "
                f"unknown: {', '.join(unknown) or 'none given'}"
            )
        return tuple(dict.fromkeys(v))

    @field_validator("counts")
    @classmethod
    def _some(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v:
            raise ValueError("counts must list at least one number of new images")
        return tuple(sorted(set(v)))


class LabelParams(Section):
    """``transferlab label suggest|import``: which unlabelled images to label next, and where
    returned labels go (``transferlab.active.suggest`` / ``.importer``)."""

    unlabelled: Path = Field(
        Path("unlabelled"), description="folder of images (or a .csv/.json manifest) to pick from"
    )
    model: str = Field("svm", description="trained model under models/ that scores the pool")
    strategy: str = "margin"
    budget: int = Field(20, ge=1)
    seed: int = 0
    out: Path = Path("labels/suggest.csv")
    thumb_size: int = Field(96, ge=16, description="longer side of the thumbnails (px)")

    @field_validator("model")
    @classmethod
    def _frozen_backbone_method(cls, v: str) -> str:
        # the pool is scored on cached features: only a method whose backbone stays frozen fits
        usable = [m.name for m in METHODS.values() if not m.trains_backbone]
        if v not in usable:
            raise ValueError(
                f"label.model {v!r} must be a method on the frozen backbone's features: "
                f"{', '.join(usable)}"
            )
        return v

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        from transferlab.active.strategies import STRATEGIES

        if v not in STRATEGIES:
            raise ValueError(f"unknown strategy {v!r}; choose from: {', '.join(STRATEGIES)}")
        return v


# ---------------------------------------------------------------- attacks


# Registry names that the attack stage accepts (transferlab.attacks.ATTACKS, minus pgd_l2 whose
# eps is an L2 norm and does not share the L-inf sweep). Literal, so a typo lists the choices.
AttackName = Literal[
    "fgsm", "bim", "pgd", "mifgsm", "square", "nes", "spsa", "hopskipjump",
    "apgd", "apgd_t", "fab_t", "autoattack",
]  # fmt: skip
WhiteBoxName = Literal["fgsm", "bim", "pgd", "mifgsm"]


def _optional_eps(v: Any) -> float | None:
    return None if v is None else parse_eps(v)


class FgsmParams(Section):
    # targeted: aim at each image's least-likely class (Kurakin et al.); success = target reached
    targeted: bool = False


class PgdParams(Section):
    steps: int = Field(10, ge=1)
    # absolute step in pixels ("1/255"); null: 2.5 * eps / steps (Madry et al.)
    step_size: float | None = None
    restarts: int = Field(1, ge=1)
    random_start: bool = True
    # stop on each image at the first iterate that fools the model: robust accuracy can only
    # fall, and the rest of the steps run on the images still standing (transfer crafting
    # always takes every step)
    early_stop: bool = True

    _step = field_validator("step_size", mode="before")(
        classmethod(lambda cls, v: _optional_eps(v))
    )


class BimParams(Section):
    steps: int = Field(10, ge=1)
    step_size: float | None = None
    early_stop: bool = True

    _step = field_validator("step_size", mode="before")(
        classmethod(lambda cls, v: _optional_eps(v))
    )


class MifgsmParams(Section):
    steps: int = Field(10, ge=1)
    step_size: float | None = None  # null: eps / steps (Dong et al.)
    momentum: float = Field(1.0, ge=0.0)
    early_stop: bool = True

    _step = field_validator("step_size", mode="before")(
        classmethod(lambda cls, v: _optional_eps(v))
    )


class ApgdParams(Section):
    steps: int = Field(100, ge=1, description="iterations per restart (AutoAttack: 100)")
    restarts: int = Field(1, ge=1)
    loss: Literal["ce", "dlr"] = "ce"  # ce: APGD-CE; dlr: APGD-DLR (needs >= 3 classes)
    rho: float = Field(0.75, gt=0.0, le=1.0)
    early_stop: bool = True


class ApgdTParams(Section):
    steps: int = Field(100, ge=1, description="iterations per target class")
    n_target_classes: int = Field(9, ge=1)
    early_stop: bool = True


class FabTParams(Section):
    steps: int = Field(100, ge=1, description="iterations per target class")
    n_target_classes: int = Field(9, ge=1)
    early_stop: bool = True


class AutoAttackParams(Section):
    """The standard ensemble (APGD-CE, APGD-T, FAB-T, Square); defaults are the reference's."""

    steps: int = Field(100, ge=1, description="APGD and FAB iterations (per target)")
    n_target_classes: int = Field(9, ge=1)
    square_queries: int = Field(5000, ge=0, description="0 leaves Square out")


class MaskingParams(Section):
    """Gradient-masking probes (transferlab/masking.py), judged by the sanity flags."""

    enabled: bool = False
    eps: EpsField | None = None  # null: attack.report_eps
    steps: tuple[int, ...] = (1, 4, 20)  # PGD steps of eps / 4 from the clean image
    square_queries: int = Field(200, ge=0, description="black-box probe (0: none)")
    large_eps: EpsField = Field(64 / 255, validate_default=True)

    _eps = field_validator("eps", mode="before")(classmethod(lambda cls, v: _optional_eps(v)))
    _large = field_validator("large_eps", mode="before")(classmethod(lambda cls, v: parse_eps(v)))

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(v) < 2 or any(s < 1 for s in v) or list(v) != sorted(set(v)):
            raise ValueError("steps must be at least two increasing step counts >= 1")
        return v


class SquareParams(Section):
    max_queries: int = Field(100, ge=1, description="queries per image, the clean one included")
    p_init: float = Field(0.05, gt=0.0, le=1.0)


class NesParams(Section):
    max_queries: int = Field(200, ge=1)
    samples: int = Field(10, ge=1, description="antithetic pairs per gradient estimate")
    sigma: float = Field(1e-3, gt=0.0)
    step_size: float | None = None  # null: eps / 4

    _step = field_validator("step_size", mode="before")(
        classmethod(lambda cls, v: _optional_eps(v))
    )


class SpsaParams(Section):
    max_queries: int = Field(200, ge=1)
    samples: int = Field(10, ge=1)
    sigma: float = Field(0.01, gt=0.0)
    step_size: float | None = None  # Adam learning rate in pixels; null: eps / 4

    _step = field_validator("step_size", mode="before")(
        classmethod(lambda cls, v: _optional_eps(v))
    )


class HopSkipJumpParams(Section):
    max_queries: int = Field(1000, ge=1)
    init_evals: int = Field(100, ge=1, description="probes of the first boundary estimate")
    max_evals: int = Field(10_000, ge=1, description="most probes per boundary estimate")
    init_tries: int = Field(100, ge=1, description="random images tried as a start")
    gamma: float = Field(1.0, gt=0.0)


class TransferParams(Section):
    """Craft on each source, evaluate on every attacked model (``attack.models``).

    Sources are stored model names or "imagenet": the public backbone with its ImageNet head,
    attacked away from its own clean ImageNet prediction.
    """

    sources: tuple[str, ...] = ()
    attack: WhiteBoxName = "mifgsm"
    eps: EpsField = Field(4 / 255, validate_default=True)

    _eps = field_validator("eps", mode="before")(classmethod(lambda cls, v: parse_eps(v)))

    @field_validator("sources")
    @classmethod
    def _names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _model_names(v, allow_empty=True)


IMAGENET = "imagenet"


def attackable_models() -> tuple[str, ...]:
    """Models the attack stage can load: each attackable method's folder under models/ (the
    method registry), or "imagenet", the public backbone with its ImageNet head."""
    return (*attackable_methods(), IMAGENET)


def _model_names(v: tuple[str, ...], *, allow_empty: bool = False) -> tuple[str, ...]:
    allowed = list(attackable_models())
    if not v and not allow_empty:
        raise ValueError(f"list at least one model; allowed values are {allowed}")
    for name in v:
        if name not in allowed:
            raise ValueError(f"unknown model {name!r}; allowed values are {allowed}")
    if len(set(v)) != len(v):
        raise ValueError("model names must not repeat")
    return v


class AttackParams(Section):
    # attackable_models(): stored methods (folders under models/) or "imagenet" (the public
    # backbone + its ImageNet head, scored against its own clean prediction)
    models: tuple[str, ...] = Field(default_factory=lambda: attackable_methods()[:1])
    attacks: tuple[AttackName, ...] = ("fgsm",)
    eps: tuple[EpsField, ...] = Field(
        (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255), validate_default=True
    )
    report_eps: EpsField = Field(4 / 255, validate_default=True)
    max_images: int = Field(64, ge=1, description="attack at most this many test images")
    batch_size: int = Field(16, ge=1)
    seed: Seed = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    # finished shards (model x attack x eps x batch) are kept here so a killed run resumes
    work_dir: Path = Path(".transferlab/attack-work")
    grid_images: int = Field(
        8, ge=0, description="rows of the adversarial-example grid: one per model and attack"
    )
    fgsm: FgsmParams = Field(default_factory=FgsmParams)
    bim: BimParams = Field(default_factory=BimParams)
    pgd: PgdParams = Field(default_factory=PgdParams)
    mifgsm: MifgsmParams = Field(default_factory=MifgsmParams)
    apgd: ApgdParams = Field(default_factory=ApgdParams)
    apgd_t: ApgdTParams = Field(default_factory=ApgdTParams)
    fab_t: FabTParams = Field(default_factory=FabTParams)
    autoattack: AutoAttackParams = Field(default_factory=AutoAttackParams)
    masking: MaskingParams = Field(default_factory=MaskingParams)
    square: SquareParams = Field(default_factory=SquareParams)
    nes: NesParams = Field(default_factory=NesParams)
    spsa: SpsaParams = Field(default_factory=SpsaParams)
    hopskipjump: HopSkipJumpParams = Field(default_factory=HopSkipJumpParams)
    transfer: TransferParams = Field(default_factory=TransferParams)

    @field_validator("eps", mode="before")
    @classmethod
    def _eps_list(cls, v: Any) -> tuple[float, ...]:
        if not isinstance(v, list | tuple) or not v:
            raise ValueError("eps must be a non-empty list like [0, 2/255, 4/255]")
        return tuple(sorted(parse_eps(e) for e in v))

    @field_validator("report_eps", mode="before")
    @classmethod
    def _eps(cls, v: Any) -> float:
        return parse_eps(v)

    @field_validator("models")
    @classmethod
    def _models(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _model_names(v)

    @field_validator("attacks")
    @classmethod
    def _unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or len(set(v)) != len(v):
            raise ValueError("attacks must be a non-empty list without repeats")
        return v

    def attack_kwargs(self, name: str) -> dict[str, Any]:
        """Hyperparameters for ``make_attack(name, eps=..., **kwargs)`` from this section."""
        kwargs = dict(getattr(self, name).model_dump())
        if name == "fgsm":
            kwargs.pop("targeted")  # the stage picks the targets; see transferlab.robustness
        if name not in ("fgsm", "bim", "fab_t"):  # deterministic ones take no seed
            kwargs["seed"] = self.seed
        return kwargs


# ---------------------------------------------------------------- tracking


class TrackingParams(Section):
    experiment: str = Field("transferlab", min_length=1)
    # MLFLOW_TRACKING_URI in the environment wins over this.
    tracking_uri: str = "sqlite:///mlruns.db"

    _uri = field_validator("tracking_uri")(classmethod(lambda cls, v: _no_credentials(v)))
    artifact_dir: Path = Path("mlartifacts")


# ---------------------------------------------------------------- runner


class RunnerParams(Section):
    """Where the Prefect flow runs the feature shards (it never changes the features)."""

    kind: Literal["local", "dask", "ray"] = "local"
    # an existing cluster: dask "tcp://host:8786", ray "ray://host:10001"; null starts a local one
    address: str | None = None
    workers: int = Field(2, ge=1, description="workers of the local cluster (no address)")

    _address = field_validator("address")(classmethod(lambda cls, v: _no_credentials(v)))
    shards: int | None = Field(
        None, ge=1, description="manifest shards to map over (null: 1 local, else workers)"
    )


# ---------------------------------------------------------------- promotion gate


class GateParams(Section):
    """The robustness regression gate: when a registered model version may become ``champion``.

    A candidate is promoted only if its clean and robust accuracy (under ``attack`` at ``eps``)
    clear the floors and, against the current champion, it is significantly better on one and
    significantly worse on neither (paired McNemar test at level ``alpha`` on the same images, or
    non-overlapping intervals); a regression must also exceed ``max_drop``.
    """

    # strongest: per image, robust only if it survives every attack that ran at eps
    attack: str = "strongest"
    eps: EpsField = Field(4 / 255, validate_default=True)
    min_clean_acc: float = Field(0.5, ge=0.0, le=1.0)
    min_robust_acc: float = Field(0.0, ge=0.0, le=1.0)
    alpha: float = Field(0.05, gt=0.0, lt=1.0, description="significance level of comparisons")
    max_drop: float = Field(
        0.0, ge=0.0, le=1.0, description="a significant fall must also exceed this to block"
    )
    alias: str = Field("champion", min_length=1)

    @field_validator("eps", mode="before")
    @classmethod
    def _eps(cls, v: Any) -> float:
        return parse_eps(v)

    @field_validator("attack")
    @classmethod
    def _attack(cls, v: str) -> str:
        allowed = ("strongest", *get_args(AttackName))
        if v not in allowed:
            raise ValueError(f"unknown attack {v!r}; allowed values are {', '.join(allowed)}")
        return v


class ParamsBase(Section):
    """What every ``Params`` has; ``Params`` adds one field per section (see below)."""

    @model_validator(mode="after")
    def _equal_trials(self):
        # the fair protocol: every method gets as many hyperparameter trials as the others
        # (a section without trials() has nothing to tune)
        sections = {name: getattr(self, name) for name in METHODS}
        counts = {n: len(s.trials()) for n, s in sections.items() if hasattr(s, "trials")}
        if len(set(counts.values())) > 1:
            shown = ", ".join(f"{n} {c}" for n, c in counts.items())
            raise ValueError(
                f"every method gets the same number of hyperparameter trials, got {shown}; "
                "make svm.C and each method's search grid the same size"
            )
        return self

    def section_hash(self, *names: str) -> str:
        """Digest of the named sections (all when none): what a stage's cache depends on."""
        dump = self.model_dump(mode="json")
        chosen = {n: dump[n] for n in (names or dump)}
        blob = json.dumps(chosen, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def flat(self) -> dict[str, str]:
        """``section.key`` -> value strings, for MLflow params.

        Keys below a mapping can be class names (``data.source.classes``), so every key goes
        through :func:`~transferlab.names.metric_key`.
        """
        out: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(metric_key(f"{prefix}.{k}" if prefix else str(k)), v)
            else:
                out[prefix] = json.dumps(value) if isinstance(value, list) else str(value)

        walk("", self.model_dump(mode="json"))
        return out


def _build_params() -> type[ParamsBase]:
    """``Params``: the fixed sections, with each registered method's section after ``features``
    (a method's section is its ``params`` model in ``transferlab.methods``)."""

    def section(model: type[Section]):
        return (model, Field(default_factory=model))

    fields = {
        "data": section(DataParams),
        "split": section(SplitParams),
        "features": section(FeaturesParams),
        **{name: section(m.params) for name, m in METHODS.items()},
        "learning_curve": section(LearningCurveParams),
        "active_learning": section(ActiveLearningParams),
        "label": section(LabelParams),
        "new_class": section(NewClassParams),
        "attack": section(AttackParams),
        "tracking": section(TrackingParams),
        "runner": section(RunnerParams),
        "gate": section(GateParams),
    }
    return create_model("Params", __base__=ParamsBase, __module__=__name__, **fields)


# Built from the method registry: a method's section is validated like every other
Params = _build_params()


# ---------------------------------------------------------------- loading


def _model_at(path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the key at ``path`` (to list its allowed keys)."""
    model: Any = Params
    for part in path:
        if isinstance(part, int) or model is None:
            return None
        field = model.model_fields.get(part)
        if field is None:
            return model
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        nxt = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if nxt is None and part == "source":
            return None  # a union: which member is meant depends on `kind`
        model = nxt
    return model


# Every source kind and its model, read off the ``Source`` union (a new kind is one member there).
_SOURCE_MODELS: dict[str, type[BaseModel]] = {
    m.model_fields["kind"].default: m for m in get_args(get_args(Source)[0])
}
SOURCE_KINDS = tuple(_SOURCE_MODELS)


def _one_line(err: ValidationError, file: Path) -> str:
    first = err.errors()[0]
    loc = tuple(p for p in first["loc"] if p not in SOURCE_KINDS)
    key = ".".join(str(p) for p in loc) or "<top level>"
    kind = first["type"]
    if kind == "extra_forbidden":
        owner = _model_at(loc[:-1])
        # An unknown key in data.source: list the keys of the kind that was meant.
        tags = [p for p in first["loc"] if p in SOURCE_KINDS]
        if tags and loc[:-1] == ("data", "source"):
            owner = _SOURCE_MODELS.get(tags[0], owner)
        allowed = ", ".join(owner.model_fields) if owner else "see params.yaml"
        return f"{file}: unknown key '{key}'; allowed keys here: {allowed}"
    msg = first["msg"].removeprefix("Value error, ")
    if not loc:  # a rule across sections: the input is the whole file
        return f"{file}: {msg}"
    if len(msg) > 300:  # a validator's message may quote the (long) value
        msg = msg[:296] + "...'"
    if kind == "literal_error" and "expected" in first.get("ctx", {}):
        msg = f"allowed values are {first['ctx']['expected']}"
    elif kind == "union_tag_invalid":
        msg = f"unknown kind; allowed values are {first['ctx']['expected_tags']}"
    return f"{file}: {key}: {msg} (got {_short_repr(first.get('input'))})"


def _short_repr(value: Any, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters: an error line quotes a value, never a whole tree."""
    if isinstance(value, dict | list | tuple) and _expanded_size(value, limit) > limit:
        text = f"<a {type(value).__name__} of {len(value)} item(s)>"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _expanded_size(value: Any, limit: int) -> int:
    """Nodes of ``value`` counted as if every shared (aliased) part were copied out, up to
    ``limit``: what printing, hashing or dumping it would walk. Stops early, so a structure that
    expands to billions of nodes costs ``limit`` steps; a cycle counts as over the limit."""
    count = 0
    stack = [(value, frozenset())]
    while stack:
        node, above = stack.pop()
        count += 1
        if count > limit:
            return count
        if isinstance(node, dict | list | tuple):
            if id(node) in above:
                return limit + 1
            inner = above | {id(node)}
            items = [*node.keys(), *node.values()] if isinstance(node, dict) else node
            stack.extend((child, inner) for child in items)
    return count


def _read_yaml(path: Path) -> Any:
    """The YAML of a params file, within the size, encoding and expansion bounds."""
    size = path.stat().st_size
    if size > MAX_PARAMS_BYTES:
        raise ParamsError(
            f"{path}: {size} bytes is too large for a params file (limit {MAX_PARAMS_BYTES}); "
            "check that --params names the right file"
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParamsError(
            f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start});"
            " save the file as UTF-8"
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = _short_repr(str(getattr(exc, "problem", None) or exc), 200)
        raise ParamsError(f"{path}: invalid YAML{where}: {problem}") from None
    except RecursionError:
        raise ParamsError(f"{path}: YAML nested too deeply; flatten the file") from None
    if _expanded_size(raw, MAX_PARAMS_NODES) > MAX_PARAMS_NODES:
        raise ParamsError(
            f"{path}: the YAML expands to more than {MAX_PARAMS_NODES} values (nested aliases "
            "'*name' that repeat whole trees, or a self-reference); write the values out"
        )
    return raw


_MAX_ERROR = 1000


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    """Read and validate a params file.

    Raises:
        ParamsError: one line naming the file, the key and what is allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found; pass --params PATH or create it")
    raw = _read_yaml(path)
    if raw is None:
        raise ParamsError(f"{path}: the file is empty; copy the sections from the README")
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        # Redacted: a refused URL with credentials must not print them either.
        raise ParamsError(redact(_one_line(err, path))[:_MAX_ERROR]) from None
