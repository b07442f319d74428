"""The attack stage's building blocks: which models, which inputs, shards, transfer, pictures.

``transferlab.stages.attack`` composes these through one ``AttackSession``, which loads each
model once and decodes the test set once; the Prefect flow maps ``sweep_batch`` over the
batches first (each call decodes only its batch and stores its finished shards), so the stage
then only reads them back.
A killed run resumes: finished shards are found in ``attack.work_dir`` by their content key
(model weights digest + attack config + batch pixels and labels) and never recomputed.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from transferlab.config import IMAGENET, Params
from transferlab.eps import Eps
from transferlab.layout import dataset_classes, split_rows

if TYPE_CHECKING:
    from transferlab.attacks import Attack

log = logging.getLogger(__name__)


class Autocast(nn.Module):
    """Runs the wrapped model under bf16 autocast and returns float32 logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x01: Tensor) -> Tensor:
        with torch.autocast(device_type=x01.device.type, dtype=torch.bfloat16):
            return self.model(x01).float()


def model_digest(model: nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class descriptions, index = logit position."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]


def load_attack_model(params: Params, root: Path, name: str) -> tuple[nn.Module, list[str], str]:
    """An attackable model by name: (eval-mode model, class names, weights key).

    ``imagenet`` is the public backbone with its ImageNet head; any other name is a stored model
    under ``models/<name>``. With ``attack.precision: bf16`` the model runs under autocast.
    """
    if name == IMAGENET:
        from transferlab.backbones import load_backbone

        model: nn.Module = load_backbone(params.features.backbone, params.features.pretrained)
        classes = imagenet_class_names()
    else:
        from transferlab.classifiers import load_classifier

        folder = root / "models" / name
        if not (folder / "meta.json").is_file():
            raise FileNotFoundError(
                f"{folder}: no stored model {name!r}; run its stage first or remove it from "
                "attack.models / attack.transfer.sources"
            )
        model = load_classifier(folder)
        classes = list(model.classes)
        expected = dataset_classes(root)
        if classes != expected:  # its logits would be read against the wrong names
            raise ValueError(
                f"{folder / 'meta.json'} lists classes {classes[:6]}, but data/split.csv has "
                f"{expected[:6]}; re-run the stage that writes {folder}"
            )
    key = f"{name}:{params.attack.precision}:{model_digest(model)}"
    if params.attack.precision == "bf16":
        model = Autocast(model)
    return model.eval(), classes, key


def attack_rows(params: Params, root: Path) -> list[dict]:
    """The split's test rows the attack stage uses: the first ``attack.max_images``."""
    return [r for r in split_rows(root) if r["split"] == "test"][: params.attack.max_images]


def input_spec(model: nn.Module):
    """The backbone spec a model reads its images at: the same for every model (a Classifier
    resizes inside to the size it was trained at), so all are scored on the same pixels."""
    inner = getattr(model, "model", model)  # under an Autocast wrapper
    return getattr(getattr(inner, "backbone", inner), "spec", None)


def load_test_images(
    params: Params, root: Path, classes: list[str], spec=None, rows: list[dict] | None = None
) -> tuple[Tensor, Tensor]:
    """Decode ``rows`` (default: the attack's test rows) at ``spec``'s input size.

    Returns:
        x: (N, 3, H, W) in [0, 1]; y: (N,) indices into ``classes``.
    """
    from transferlab.backbones import get_spec
    from transferlab.features import load_images

    rows = attack_rows(params, root) if rows is None else rows
    spec = spec or get_spec(params.features.backbone)
    x = load_images(
        [root / "data" / r["path"] for r in rows], spec, background=params.data.background
    )
    y = torch.tensor([classes.index(r["label"]) for r in rows], dtype=torch.long)
    return x, y


def attack_labels(params: Params, name: str, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The labels an attack on ``name`` uses: the dataset's for adapted models; for the
    ImageNet model its own clean top-1 prediction (no ImageNet labels for the dataset's images),
    so its "clean accuracy" is 1 and its robust accuracy is the fraction of images whose top-1
    ImageNet class survives the attack."""
    from transferlab.inference import predict

    if name == IMAGENET:
        return predict(model, x, batch_size=params.attack.batch_size)
    return y


def _sweep(params: Params, root: Path, name: str, x: Tensor, y: Tensor, model, key) -> list[dict]:
    from transferlab.evaluate import ShardStore, robustness_sweep

    ap = params.attack
    return robustness_sweep(
        model,
        x,
        y,
        attacks=ap.attacks,
        eps=ap.eps,
        batch_size=ap.batch_size,
        options={a: ap.attack_kwargs(a) for a in ap.attacks},
        targeted=("fgsm",) if ap.fgsm.targeted else (),
        store=ShardStore(root / ap.work_dir),
        model_key=key,
        label=name,
    )


def _masking(params: Params, model: nn.Module, x: Tensor, y: Tensor) -> list[dict]:
    """The gradient-masking probe rows (``attack.masking``), or none when it is off."""
    from transferlab.evaluate import masking_rows

    ap, mp = params.attack, params.attack.masking
    if not mp.enabled:
        return []
    return masking_rows(
        model,
        x,
        y,
        eps=ap.report_eps if mp.eps is None else mp.eps,
        budgets=[(s, 1) for s in mp.steps],
        square_queries=mp.square_queries,
        large_eps=mp.large_eps,
        seed=ap.seed,
        batch_size=ap.batch_size,
    )


def num_batches(params: Params, root: Path) -> int:
    """How many batches the attack stage splits the test images into (the Prefect map size)."""
    n = len(attack_rows(params, root))
    return (n + params.attack.batch_size - 1) // params.attack.batch_size


def sweep_batch(params: Params, root: Path, name: str, batch: int) -> int:
    """Attack one batch of one model with every attack and eps; store its shards.

    The unit of work the Prefect flow maps over: it decodes only its own batch's images.
    Returns the number of images attacked.
    """
    bs = params.attack.batch_size
    rows = attack_rows(params, root)[batch * bs : (batch + 1) * bs]
    if not rows:
        return 0
    model, _, key = load_attack_model(params, root, name)
    x, y = load_test_images(params, root, dataset_classes(root), input_spec(model), rows)
    _sweep(params, root, name, x, attack_labels(params, name, model, x, y), model, key)
    return len(rows)


class AttackSession:
    """One attack stage's models and test images: each model is loaded once and the test set
    decoded once per input size, however many sweeps, transfer pairs and pictures use them."""

    def __init__(self, params: Params, root: Path):
        self.params, self.root = params, root
        self._models: dict[str, tuple[nn.Module, list[str], str]] = {}
        self._pixels: dict[object, tuple[Tensor, Tensor]] = {}
        self._inputs: dict[str, tuple[Tensor, Tensor]] = {}
        self._classes: list[str] | None = None

    def model(self, name: str) -> tuple[nn.Module, list[str], str]:
        """(eval-mode model, class names, weights key), loaded on first use."""
        if name not in self._models:
            self._models[name] = load_attack_model(self.params, self.root, name)
        return self._models[name]

    def inputs(self, name: str) -> tuple[Tensor, Tensor]:
        """The test images at ``name``'s input size and the labels its attack uses."""
        if name not in self._inputs:
            model = self.model(name)[0]
            spec = input_spec(model)
            if spec not in self._pixels:
                if self._classes is None:
                    self._classes = dataset_classes(self.root)
                self._pixels[spec] = load_test_images(self.params, self.root, self._classes, spec)
            x, y = self._pixels[spec]
            self._inputs[name] = (x, attack_labels(self.params, name, model, x, y))
        return self._inputs[name]

    def sweep(self, name: str) -> tuple[list[dict], dict]:
        """All rows for one model (shards already in the work folder are read, not
        recomputed), and a precision check: with bf16, the clean agreement with fp32."""
        from transferlab.inference import logits

        model, _, key = self.model(name)
        x, y = self.inputs(name)
        params, root = self.params, self.root
        rows = [{"model": name, **r} for r in _sweep(params, root, name, x, y, model, key)]
        rows += [{"model": name, **r} for r in _masking(params, model, x, y)]
        check: dict = {}
        if params.attack.precision == "bf16":
            agree = logits(model.model, x).argmax(1) == logits(model, x).argmax(1)
            check = {"model": name, "bf16_fp32_agreement": float(agree.float().mean())}
        return rows, check

    def transfer(self) -> tuple[list[dict], dict[str, Tensor], Tensor]:
        """The transfer matrix for ``attack.transfer``: rows, adversarials per source, clean x."""
        from transferlab.attacks.transfer import transfer_matrix

        ap, tp = self.params.attack, self.params.attack.transfer
        names = [m for m in ap.models if m != IMAGENET]
        if not tp.sources or not names:
            return [], {}, torch.empty(0)
        targets = {m: self.model(m)[0] for m in names}
        x, y = self.inputs(names[0])
        sources = {}
        for s in tp.sources:
            model = self.model(s)[0]
            labels = attack_labels(self.params, s, model, x, y)
            sources[s] = (model, labels)
        rows, adversarials = transfer_matrix(
            sources, targets, x, y, attack=transfer_attack(self.params), batch_size=ap.batch_size
        )
        return rows, adversarials, x

    def grid(self, name: str, attack_name: str, eps: float, *, n: int | None = None) -> list[dict]:
        """See ``grid_examples``."""
        return grid_examples(self, name, attack_name, eps, n=n)


def transfer_attack(params: Params) -> Attack:
    """The attack ``attack.transfer`` crafts with: its section's hyperparameters, but every
    step taken (an image barely across the source's boundary transfers poorly)."""
    from transferlab.attacks import make_attack

    tp = params.attack.transfer
    kwargs = params.attack.attack_kwargs(tp.attack)
    if "early_stop" in kwargs:
        kwargs["early_stop"] = False
    return make_attack(tp.attack, eps=tp.eps, **kwargs)


def grid_examples(
    session: AttackSession, name: str, attack_name: str, eps: float, *, n: int | None = None
) -> list[dict]:
    """``n`` (default ``attack.grid_images``) adversarial examples of ``attack_name`` at ``eps``
    on model ``name``, captioned with the predicted label and confidence before and after (for
    ``plot_adversarial_grid``)."""
    from transferlab.attacks import make_attack

    ap = session.params.attack
    n = ap.grid_images if n is None else n
    if n == 0:
        return []
    model, classes, _ = session.model(name)
    x, y = session.inputs(name)
    x, y = x[:n], y[:n]
    attack = make_attack(attack_name, eps=eps, **ap.attack_kwargs(attack_name))
    x_adv = attack(model, x, y).x_adv
    with torch.inference_mode():
        p_clean, p_adv = model(x).float().softmax(1), model(x_adv).float().softmax(1)

    def caption(p: Tensor) -> str:
        return f"{classes[int(p.argmax())][:24]} ({float(p.max()):.0%})"

    return [
        {
            "x": x[i],
            "x_adv": x_adv[i],
            "title": f"{name} / {attack_name} {Eps(eps).label}\n{classes[int(y[i])][:20]}",
            "clean": caption(p_clean[i]),
            "adv": caption(p_adv[i]),
        }
        for i in range(len(x))
    ]
