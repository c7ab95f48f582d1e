"""The editor's requests as typed values (pydantic models): what the page may send, checked once.

``Model.read(data)`` turns any JSON value into the typed request or raises an ``HspaceError`` that names the field, the
bad value and what is valid (the app answers it as HTTP 400 with {"error": message}). Types are strict: a string
"false" is not false, 1.0 is not a seed. What depends on the editor's state (a direction's name, a sample that must
exist, a step of its schedule) is checked by the ``Editor``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError, field_validator

from ..errors import HspaceError

MAX_STRIP = 16
Number = StrictInt | StrictFloat


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    @classmethod
    def read(cls, data: Any):
        """The typed request of ``data`` (a dict from the page, or already this model), or a clear error."""
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise HspaceError(f"the request body must be a JSON object, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise HspaceError(_message(cls, e.errors()[0], data)) from None


def _message(model: type[BaseModel], error: dict, data: dict) -> str:
    """One line for a validation error: "bad FIELD VALUE; valid: ..." (the field's description says what is valid)."""
    if error["type"] == "value_error":  # a validator's own message
        return str(error["ctx"]["error"])
    field = str(error["loc"][0]) if error["loc"] else ""
    info = model.model_fields.get(field)
    valid = info.description if info is not None and info.description else error["msg"]
    return f"bad {field} {data.get(field)!r}; valid: {valid}"


class Part(Request):
    """One slider of a combination: a direction by name at a scale, inside a timestep window."""

    name: StrictStr = Field(description="the name of one of the editor's directions")
    scale: Number = Field(0.0, description="a finite number")
    window: tuple[Number, Number] | None = Field(None, description="null (every step) or [t_from, t_to], two numbers")

    @field_validator("scale")
    @classmethod
    def _finite(cls, value):
        if not math.isfinite(value):
            raise ValueError(f"bad scale {value!r}; valid: a finite number")
        return float(value)

    @field_validator("window")
    @classmethod
    def _window(cls, value):
        if value is not None and not all(abs(v) < 1e30 for v in value):
            raise ValueError(f"bad window {list(value)!r}; valid: null (every step) or [t_from, t_to], two finite numbers")
        return None if value is None else (float(value[0]), float(value[1]))


class EditRequest(Request):
    """/api/edit: the sample under a combination (the Editor's ``edit``)."""

    sample: Any = Field(None, description='{"seed": N}, {"bank": INDEX} or {"upload": ID}')
    parts: list[Any] = Field(default_factory=list, description="a list of {name, scale, window} (empty: no edit)")
    quality: Literal["preview", "final"] = Field("final", description="preview or final")
    asyrp: StrictBool = Field(False, description="true or false")
    raw: StrictBool = Field(False, description="true or false")
    strip: list[StrictInt] | None = Field(None, max_length=MAX_STRIP, description=f"a list of at most {MAX_STRIP} seeds")
    tab: Any = ""
    seq: Any = 0


class SaveRequest(Request):
    """/api/save: a combination written as one direction file."""

    name: Any = Field(None, description="a name for the direction")
    parts: Any = Field(None, description="a list of {name, scale, window}")


class JacobianRequest(Request):
    """/api/jacobian: Jacobian directions of the sample at one step, optionally masked by a part or a painted mask."""

    sample: Any = Field(None, description='{"seed": N}, {"bank": INDEX} or {"upload": ID}')
    k: StrictInt = Field(3, description="an integer from 1 to 8")
    t: Number | None = Field(None, description="one of the editor's timesteps")
    step: StrictInt | None = Field(None, description="a step index of the editor's schedule")
    part: StrictStr | None = Field(None, description="a part name of the model's domain")
    mask: Any = None


class CardRequest(Request):
    """/api/card: a card of one slider's direction."""

    name: Any = Field(None, description="the name of one of the editor's directions")
    n: StrictInt | None = Field(None, description="an integer number of held-out samples")


class LoadRequest(Request):
    """/api/load: a saved direction added as a slider."""

    file: Any = Field(None, description="a file listed by /api/saved")


class PromptSliderRequest(Request):
    """/api/prompt-direction: a prompt-pair slider (``prompt_direction``) made on the editor's process."""

    plus: StrictStr = Field(description="the prompt with the attribute, a string")
    minus: StrictStr = Field("", description="the prompt without it, a string (may be empty)")
    n: StrictInt | None = Field(None, description="an integer number of seeds")
    name: StrictStr | None = Field(None, description="a name for the slider, a string")
