"""Wire models of ``/v1/images/generations`` (the OpenAI schema, plus the diffusion knobs vLLM-Omni accepts)."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer

from serving.protocol import OpenAIBaseModel, ResponseModel

# Known OpenAI image parameters this server does not implement, with the values that ask for nothing (accepted).
IMAGE_NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "response_format": (None, "b64_json"),
    "quality": (None, "auto", "standard"),
    "style": (None,),
    "background": (None, "auto"),
    "moderation": (None, "auto"),
    "output_format": (None, "png"),
    "output_compression": (None,),
    "stream": (None, False),
    "partial_images": (None, 0),
}
UNSUPPORTED_DETAIL = {
    "response_format": "only 'b64_json' is supported: this server keeps no images to link to",
    "output_format": "images are always PNG",
}


class ImageGenerationRequest(OpenAIBaseModel):
    prompt: str = Field(min_length=1)
    model: str | None = None  # None: the server's image model
    n: int = Field(1, ge=1, le=10)
    size: str | None = Field(None, pattern=r"^(auto|\d+x\d+)$", description="'WIDTHxHEIGHT' or 'auto'.")
    user: str | None = None
    # Extras (send them in extra_body with the official SDK).
    seed: int | None = Field(None, ge=0, le=2**31 - 11)  # image i uses seed + i
    num_inference_steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0, le=100)
    negative_prompt: str | None = None

    response_format: Any = None
    quality: Any = None
    style: Any = None
    background: Any = None
    moderation: Any = None
    output_format: Any = None
    output_compression: Any = None
    stream: Any = None
    partial_images: Any = None

    @property
    def dimensions(self) -> str | None:
        return None if self.size in (None, "auto") else self.size

    def unsupported(self) -> tuple[str, str] | None:
        """The first parameter set to something this server cannot honour, with why, or None."""
        for name, neutral in IMAGE_NEUTRAL_VALUES.items():
            if getattr(self, name) not in neutral:
                return name, UNSUPPORTED_DETAIL.get(name, "")
        return None


class ImageData(ResponseModel):
    b64_json: str  # a PNG file (the guard erases concepts in embedding space, so there is no revised_prompt)


# The sizes OpenAI's ImagesResponse.size may name; any other size (512x512 from SD 1.5) is left out of the body,
# since the spec allows the key to be absent but not another value, nor null.
OPENAI_SIZES = ("1024x1024", "1024x1536", "1536x1024")


class ImagesResponse(ResponseModel):
    created: int = Field(default_factory=lambda: int(time.time()))
    data: list[ImageData]
    output_format: Literal["png"] = "png"
    size: Literal["1024x1024", "1024x1536", "1536x1024"] | None = None

    @model_serializer(mode="wrap")
    def _without_unnamed_size(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        body = handler(self)
        if body.get("size") is None:
            body.pop("size", None)
        return body
