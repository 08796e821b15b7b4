"""Item feature encoders (docs/model.md#item-features): text and vision, each a batched callable built once."""

from speeder.encoders.text import (
    BackboneTextEncoder,
    HashingTextEncoder,
    HFTextEncoder,
    TextEncoder,
    build_text_encoder,
    minilm_encoder,
    minilm_path,
)
from speeder.encoders.vision import (
    MAX_IMAGE_PIXELS,
    EfficientNetLite0Encoder,
    HFVisionEncoder,
    VisionEncoder,
    build_vision_encoder,
    decode_image,
)

__all__ = [
    "MAX_IMAGE_PIXELS",
    "BackboneTextEncoder",
    "EfficientNetLite0Encoder",
    "HFTextEncoder",
    "HFVisionEncoder",
    "HashingTextEncoder",
    "TextEncoder",
    "VisionEncoder",
    "build_text_encoder",
    "build_vision_encoder",
    "decode_image",
    "minilm_encoder",
    "minilm_path",
]
