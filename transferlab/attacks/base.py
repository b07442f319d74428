"""The attack contract: hyperparameters at construction, model at call (like foolbox).

Every attack works in pixel space: images are in [0, 1] and the model normalises inside, so
``eps`` means the same thing for every model. ``Attack.__call__`` is the one place that clips to
the eps-ball and to [0, 1], checks success, counts model calls and times the attack; subclasses
only implement ``run``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, final

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

NORMS = ("linf", "l2")


@dataclass
class AttackResult:
    """What one attack call produced.

    Attributes:
        x_adv: (N, C, H, W) float32 adversarial images in [0, 1], within the eps-ball of x.
        success: (N,) bool. Untargeted: prediction != y. Targeted: prediction == y (the target).
        queries: (N,) int64 forward-only model calls spent per image by the attack. Forward +
            backward passes are counted in ``gradients`` instead, so white-box attacks report 0
            unless they score candidates (e.g. PGD restarts). The final success check is free.
        gradients: number of gradient evaluations (batch calls, forward + backward).
        seconds: wall-clock time of the whole call.
        logits: (N, K) float32 model outputs on ``x_adv`` (from the success check), so callers
            need no second forward pass for predictions or confidences.
    """

    x_adv: Tensor
    success: Tensor
    queries: Tensor
    gradients: int
    seconds: float
    logits: Tensor | None = None

    @property
    def success_rate(self) -> float:
        """Fraction of images on which the attack succeeded."""
        return float(self.success.float().mean()) if self.success.numel() else 0.0


@dataclass
class Candidates:
    """What ``Attack.run`` may return instead of bare images: the images plus the model's logits
    on the rows the attack already evaluated, so the success check skips those rows.

    Attributes:
        x_adv: (N, C, H, W) candidate images.
        logits: (N, K) model outputs, valid in the rows where ``known`` is True; None if none is.
        known: (N,) bool, rows whose ``logits`` are the model's output on exactly ``x_adv``.
    """

    x_adv: Tensor
    logits: Tensor | None
    known: Tensor

    @classmethod
    def unevaluated(cls, x_adv: Tensor) -> Candidates:
        return cls(x_adv, None, torch.zeros(x_adv.shape[0], dtype=torch.bool, device=x_adv.device))

    def all_logits(self, forward: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """(N, K) float logits on every candidate: the known rows as they are, and
        ``forward(x_rows, rows)`` (without gradients) for the others."""
        known = self.known if self.logits is not None else torch.zeros_like(self.known)
        with torch.no_grad():
            if not known.any():
                rows = torch.arange(self.x_adv.shape[0], device=self.x_adv.device)
                return forward(self.x_adv, rows).float()
            logits = self.logits.detach().float()
            if known.all():
                return logits
            logits = logits.clone()
            rows = (~known).nonzero().squeeze(1)
            logits[rows] = forward(self.x_adv[rows], rows).float()
        return logits


def project(x: Tensor, x_adv: Tensor, *, eps: float, norm: str) -> Tensor:
    """Project ``x_adv`` onto the eps-ball around ``x`` and then onto the box [0, 1].

    Clamping to [0, 1] after the ball projection never leaves the ball: x is in [0, 1], so the
    clamp only moves each pixel towards x. The L-inf ball uses min/max against ``x +- eps``
    rather than clamping the difference, so a full step of exactly ``eps`` lands bit-exactly on
    ``x + eps`` (this is what makes FGSM match the reference implementations exactly).

    Args:
        x: (N, C, H, W) clean images in [0, 1].
        x_adv: (N, C, H, W) candidate images, any range.
        eps: radius in pixel units (L-inf) or per-image Euclidean norm (L2); >= 0.
        norm: "linf" or "l2".

    Returns:
        (N, C, H, W) images in [0, 1] with ||x_adv - x|| <= eps per image.
    """
    if norm == "linf":
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps)
    elif norm == "l2":
        delta = x_adv - x
        norms = delta.flatten(1).norm(p=2, dim=1)
        # Only shrink; images already inside the ball keep their perturbation untouched.
        factor = torch.where(norms > eps, eps / norms.clamp_min(1e-12), torch.ones_like(norms))
        x_adv = x + delta * factor.view(-1, *([1] * (x.dim() - 1)))
    else:
        raise ValueError(f"unknown norm {norm!r}; allowed values are {list(NORMS)}")
    return x_adv.clamp(0.0, 1.0)


class CallCounter(nn.Module):
    """Wraps a model and counts its calls, as the attack sees it.

    A call with autograd on and an input that requires grad is one gradient evaluation (a
    batch call); any other call is a query, counted per image. Attacks that evaluate a subset
    of the batch pass ``index`` (positions in the original batch).
    """

    def __init__(self, model: nn.Module, n: int, device: torch.device):
        super().__init__()
        self.model = model
        self.queries = torch.zeros(n, dtype=torch.int64, device=device)
        self.gradients = 0
        # nn.Module starts in training mode; the wrapper must not look like a training model.
        self.train(False)

    def forward(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            self.gradients += 1
        elif index is None:
            if x.shape[0] != self.queries.shape[0]:
                raise ValueError(
                    f"a query on {x.shape[0]} of {self.queries.shape[0]} images needs `index`"
                )
            self.queries += 1
        else:
            self.queries.index_add_(0, index, torch.ones_like(index, dtype=torch.int64))
        return self.model(x)


@contextmanager
def _frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Turn off requires_grad on the parameters while attacking, then restore the flags.

    The attack only needs gradients with respect to the input; parameter gradients would cost
    time and memory and could leak into an optimizer's .grad.
    """
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


@contextmanager
def attacking(model: nn.Module, x: Tensor, y: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
    """Check the model and inputs and set up autograd for attacking; yields float32 ``x`` and
    int64 ``y`` copies on x's device.

    Raises:
        ValueError: if the model (or any submodule) is in training mode, the inputs are out of
            range or the shapes do not match.
    """
    training = [name or "<model>" for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            f"model must be in eval mode (call model.eval()); in training mode: {training[:5]}"
        )
    # Tensors made under inference_mode cannot enter autograd, so leave it and clone.
    with torch.inference_mode(False), torch.enable_grad(), _frozen_parameters(model):
        x = x.detach().to(torch.float32).clone()
        y = y.detach().to(device=x.device, dtype=torch.int64).clone()
        Attack._check_inputs(x, y)
        yield x, y


class Attack:
    """Base class of all attacks. Hyperparameters at construction, model at call.

    Subclasses implement ``run``; ``__call__`` is final and wraps it with the checks, the
    projection, the success test and the bookkeeping.

    Args:
        eps: perturbation budget in pixel space ([0, 1] images); L-inf radius or L2 norm.
        targeted: if True, ``y`` holds target classes and the attack tries to reach them.
    """

    name: ClassVar[str] = "attack"
    norm: str = "linf"

    def __init__(self, *, eps: float, targeted: bool = False):
        if not eps >= 0:  # also rejects NaN
            raise ValueError(f"eps must be >= 0, got {eps}")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; allowed values are {list(NORMS)}")
        self.eps = float(eps)
        self.targeted = bool(targeted)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"

    def run(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor | Candidates:
        """Search for adversarial images. Implemented by subclasses.

        Args:
            model: eval-mode classifier, (N, C, H, W) images in [0, 1] -> (N, K) logits. Its
                parameters do not require grad; call counts are recorded by a wrapper.
            x: (N, C, H, W) float32 clean images in [0, 1], not requiring grad.
            y: (N,) int64 true labels (untargeted) or target labels (targeted).

        Returns:
            (N, C, H, W) candidate images; ``__call__`` projects them onto the eps-ball and
            [0, 1], so ``run`` need not be exact about the last projection. Or ``Candidates``
            carrying the logits the attack already has for some rows (e.g. images an iterative
            attack stopped early on), which the success check then reuses.
        """
        raise NotImplementedError

    @final
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> AttackResult:
        """Attack ``model`` on ``(x, y)``.

        Args:
            model: classifier in eval mode taking (N, C, H, W) images in [0, 1] and returning
                (N, K) logits. Neither its parameters, buffers, mode nor requires_grad flags are
                changed.
            x: (N, C, H, W) images in [0, 1]; converted to float32.
            y: (N,) integer labels, true classes (untargeted) or targets (targeted).

        Returns:
            The adversarial images with success flags, call counts and time.

        Raises:
            ValueError: if the model (or any submodule) is in training mode, the inputs are out
                of range or the shapes do not match.
        """
        start = time.perf_counter()
        with attacking(model, x, y) as (x, y):
            counter = CallCounter(model, x.shape[0], x.device)
            if self.eps == 0 or x.shape[0] == 0:
                found = Candidates.unevaluated(x.clone())
            else:
                found = self.run(counter, x, y)
                if not isinstance(found, Candidates):
                    found = Candidates.unevaluated(found)
            return self.result(model, x, y, found, counter, start=start)

    def result(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        found: Candidates,
        counter: CallCounter,
        *,
        start: float,
    ) -> AttackResult:
        """The checked result of candidates ``found`` for ``(x, y)``: projected onto the
        eps-ball and [0, 1], with success flags from the model's logits on them. Call it inside
        ``attacking``; ``start`` is the ``time.perf_counter()`` the attack began at."""
        x_adv, logits = self._checked(model, x, found)
        success = self._adversarial(logits.argmax(dim=1), y)
        result = AttackResult(
            x_adv=x_adv,
            success=success,
            queries=counter.queries,
            gradients=counter.gradients,
            seconds=time.perf_counter() - start,
            logits=logits,
        )
        log.debug(
            "%r: success %.3f on %d images, %d gradients, %.2f s",
            self,
            result.success_rate,
            x.shape[0],
            result.gradients,
            result.seconds,
        )
        return result

    def _checked(self, model: nn.Module, x: Tensor, found: Candidates) -> tuple[Tensor, Tensor]:
        """Project the candidates and get the model's logits on every one of them.

        Rows the attack already evaluated keep their logits, unless the projection moved them;
        the others take one forward pass (the success check, not counted as queries).
        """
        x_adv = found.x_adv.detach().to(torch.float32)
        if x_adv.shape != x.shape:
            raise RuntimeError(
                f"{type(self).__name__}.run returned shape {tuple(x_adv.shape)}, "
                f"expected {tuple(x.shape)}"
            )
        projected = project(x, x_adv, eps=self.eps, norm=self.norm)
        known = found.known.to(x.device)
        if found.logits is not None and known.any():
            known = known & (projected == x_adv).flatten(1).all(dim=1)
        checked = Candidates(projected, found.logits, known)
        return projected, checked.all_logits(lambda xs, _rows: model(xs))

    def _adversarial(self, pred: Tensor, y: Tensor) -> Tensor:
        """Which predicted labels count as a success: untargeted != y, targeted == y."""
        return pred == y if self.targeted else pred != y

    @staticmethod
    def _check_inputs(x: Tensor, y: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"x must be a batch (N, C, H, W), got shape {tuple(x.shape)}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise ValueError(
                f"x must be in [0, 1] (normalise inside the model), got range "
                f"[{float(x.min()):.3g}, {float(x.max()):.3g}]"
            )
