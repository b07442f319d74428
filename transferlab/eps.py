"""An L-inf budget as one typed value: parsed once, written one way.

``params.yaml`` says ``4/255`` or ``0.0157``; ``config`` turns either into an ``Eps`` (a float, so
arithmetic and JSON are unchanged) and every key, label and title is built from ``Eps.k``, the
budget in 1/255 steps. Nothing re-parses a key or a label back into a number.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Annotated, Any

from pydantic import AfterValidator


class Eps(float):
    """An L-inf budget in pixel space (images in [0, 1]). ``str``/``repr`` stay float's: CSV
    and JSON writers and f-strings see the plain number."""

    __slots__ = ()

    @classmethod
    def parse(cls, value: Any) -> Eps:
        """``4/255``, ``"0.03"`` or ``0.03`` as an ``Eps`` in [0, 1].

        Raises:
            ValueError: not a number or fraction, or outside [0, 1].
        """
        if isinstance(value, bool):
            raise ValueError(f"eps must be a number or a fraction like '4/255', got {value!r}")
        if isinstance(value, int | float):
            eps = float(value)
        elif isinstance(value, str):
            try:
                eps = float(Fraction(value.replace(" ", "")))
            except (ValueError, ZeroDivisionError):
                raise ValueError(
                    f"eps {value!r} does not parse; write a number or a fraction like '4/255'"
                ) from None
        else:
            raise ValueError(f"eps must be a number or a fraction like '4/255', got {value!r}")
        if not 0.0 <= eps <= 1.0:
            raise ValueError(f"eps {value!r} is outside [0, 1] (pixel space, images in [0, 1])")
        return cls(eps)

    @property
    def k(self) -> str:
        """The budget in 1/255 steps, the one formatter: ``4``, ``0.5``, ``8``."""
        return f"{float(self) * 255:g}"

    @property
    def label(self) -> str:
        """``4/255``: titles, tables, logs."""
        return f"{self.k}/255"

    @property
    def key(self) -> str:
        """``eps_4/255``: the per-eps key of ``metrics/attack.json``'s summary."""
        return f"eps_{self.label}"

    def metric(self, attack: str) -> str:
        """``robust_acc_<attack>_eps_4``: the MLflow scalar of one attack at this eps."""
        return f"robust_acc_{attack}_eps_{self.k}"

    def headline(self, attack: str) -> str:
        """``robust_acc_<attack>_at_4_255``: the MLflow headline at the report eps (MLflow names
        allow no ``@``, and a ``/`` would file the metric under a chart group of its own)."""
        return f"robust_acc_{attack}_at_{self.k.replace('.', 'p')}_255"


# A pydantic field: validated as a float, then typed (pydantic would turn a float subclass back
# into a float)
EpsField = Annotated[float, AfterValidator(Eps)]
