"""The reliability table: each case states the fault, the expected outcome and what stays intact."""

from __future__ import annotations

from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class Case:
    id: str
    fault: str
    expected: str
    intact: str

    def param(self, *values):
        """A pytest.param carrying this case, so the summary can report it."""
        return pytest.param(self, *values, id=self.id, marks=pytest.mark.reliability(self))
