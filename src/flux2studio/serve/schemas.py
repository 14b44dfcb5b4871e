"""The request bodies of the HTTP API (pydantic): a native job, and OpenAI's image generation."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import HTTPException
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError


def _a_number(value: object) -> object:
    """Numbers as JSON numbers: true was 1 step and "128" a width (pydantic's lax mode); 1024.0 stays a width."""
    if isinstance(value, bool | str | bytes):
        raise ValueError(f"must be a number, not {type(value).__name__} {value!r}"[:80])
    return value


Int = Annotated[int, BeforeValidator(_a_number)]
Num = Annotated[float, BeforeValidator(_a_number)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1), BeforeValidator(_a_number)]  # (so the schema keeps its bounds)


class JobRequest(BaseModel):
    # a misspelt field ("step": 50) is an error, not the default run silently; NaN and infinities are refused
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = Field(default=None, max_length=64)  # None: the server's default (Admission.model_or_default)
    prompt: str  # text fields: length, NUL and Unicode checked in validate (Limits.text_problem)
    negative_prompt: str | None = None
    width: Int | None = None
    height: Int | None = None
    aspect: str | None = Field(default=None, max_length=16)
    steps: Int | None = None
    guidance: Num | None = None
    guidance_interval: tuple[Num, Num] | None = None  # CFG models: noise levels guided (default: the model's)
    prompt_upsampling: StrictBool | None = (
        None  # nano: the planner (default on); flex, Kontext: the API's (default off)
    )
    seed: Seed | None = None
    num_images: Int = 1
    refs: list[str] = []  # upload ids
    loras: list[tuple[str, Num]] = []  # server-side LoRA names (see --lora-dir) and scales
    # editing (local models): a start image (upload id) for image-to-image; with a mask (upload id, white =
    # repaint) or an expansion (px left, top, right, bottom) only that area is generated
    image: str | None = Field(default=None, max_length=64)
    mask: str | None = Field(default=None, max_length=64)
    strength: Num | None = None  # (0, 1]; default 0.75, 1 with a mask or expansion
    expand: tuple[Int, Int, Int, Int] | None = None
    mask_blur: Int = 0


class OpenAIGeneration(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)  # OpenAI's other fields (quality, style, user) are ignored

    prompt: str
    model: str | None = Field(default=None, max_length=64)  # None: the server's default
    n: Int = 1
    size: str | None = Field(default=None, max_length=16)  # "WIDTHxHEIGHT"
    response_format: Literal["b64_json", "url"] = "b64_json"
    seed: Seed | None = None
    steps: Int | None = None
    guidance: Num | None = None
    negative_prompt: str | None = None
    stream: StrictBool = False  # partial images are not streamed: True is a clear 400


def job_request(**fields) -> JobRequest:
    """A JobRequest from another route's fields; a field out of range is a 422 naming it, not a crash."""
    try:
        return JobRequest(**fields)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise HTTPException(422, problems) from None
