"""The base of every ``params.yaml`` section (its own module, so the method registry and the
config can both build on it without importing each other)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A frozen section that rejects unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)
