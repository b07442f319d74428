"""The base of every ``params.yaml`` section (its own module, so the method registry and the
config can both build on it without importing each other)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Every integer goes on to numpy, torch or sklearn, whose C code takes 32-bit values in places
# (seeds, sizes); larger ones would pass validation and fail, or overflow, later.
MAX_INT = 2**31 - 1


class Section(BaseModel):
    """A frozen section that rejects unknown keys, non-finite floats and out-of-range ints."""

    # allow_inf_nan=False: .inf and .nan are valid YAML floats, and no setting means them.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _bounded_ints(cls, v: Any) -> Any:
        for item in v if isinstance(v, tuple) else (v,):
            if isinstance(item, int) and not isinstance(item, bool) and abs(item) > MAX_INT:
                raise ValueError(f"{item} is out of range; use a value below {MAX_INT + 1}")
        return v


Seed = Annotated[int, Field(ge=0, le=MAX_INT, description="random seed, 0 <= seed < 2**31")]
