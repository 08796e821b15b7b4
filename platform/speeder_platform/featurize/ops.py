"""The per-batch work of `speeder featurize`: image location and decoding, and the encoder actors.

Everything here runs inside Ray tasks and actors on pyarrow batches. Bad bulk data never raises: each
image ends with one status (IMAGE_STATUSES) and a null feature where it could not be used.

Image URIs (`items.parquet` image_uri) are resolved against the dataset root:
- relative paths are relative to the root; `..` and symlinks are resolved first, and anything that
  lands outside the root is refused (`refused_path`), e.g. `../../etc/passwd` or a link to /etc;
- `file://` and absolute local paths are read only when they resolve inside a local root;
- `s3://` URIs are read wherever they point (object storage the job was given credentials for);
- `http(s)://` URLs are not fetched: the platform runs offline (`remote_not_fetched`); download the
  images first (`speeder data prepare ... --images`) to use them;
- missing files are `missing`, undecodable, truncated, oversized or non-image bytes are `corrupt`, and
  other I/O errors after retries are `unreadable`.
"""

from __future__ import annotations

import logging
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from speeder import schema
from speeder_platform import storage

log = logging.getLogger("speeder.featurize")

OK, NO_IMAGE, MISSING, CORRUPT = "ok", "no_image", "missing", "corrupt"
REFUSED, REMOTE, UNREADABLE = "refused_path", "remote_not_fetched", "unreadable"
IMAGE_STATUSES = (OK, NO_IMAGE, MISSING, CORRUPT, REFUSED, REMOTE, UNREADABLE)
IMAGE = "image"  # decoded pixels between the decode task and the vision actors: (S*S*3,) uint8 bytes
IMAGE_STATUS = "image_status"
MAX_IMAGE_BYTES = 64 << 20  # larger files are refused unread (a product photo is a few MB at most)
IMAGE_READERS = 8  # concurrent reads per batch: object-store latency, not CPU, bounds a read
EMB_TYPE = pa.list_(pa.float32())


def list_column(values: np.ndarray, present: np.ndarray | None = None) -> pa.ListArray:
    """(B, d) float32 rows -> list<float32> column, null where `present` (B,) is False."""
    n, d = values.shape
    present = np.ones(n, bool) if present is None else np.asarray(present, bool)
    offsets = np.zeros(n + 1, np.int64)
    offsets[1:] = np.cumsum(np.where(present, d, 0))
    flat = pa.array(values[present].astype(np.float32, copy=False).ravel(), pa.float32())
    out = pa.LargeListArray.from_arrays(pa.array(offsets), flat, mask=pa.array(~present))
    return out.cast(EMB_TYPE)


def null_column(n: int) -> pa.Array:
    return pa.nulls(n, EMB_TYPE)


# -- image location ---------------------------------------------------------------------------------
def _inside(path: str, root: str) -> bool:
    return path != root and os.path.commonpath([path, root]) == root


def locate_image(image_uri: str | None, root: str) -> tuple[str, str | None]:
    """Where to read an item's image from: ("read", uri) or (final status, None). Never raises.

    `root` is the dataset root (local folder or s3://). See the module docstring for the rules.
    """
    if image_uri is None or not image_uri.strip():
        return NO_IMAGE, None
    uri = image_uri.strip()
    lower = uri.lower()
    try:
        if lower.startswith(("http://", "https://")):
            return REMOTE, None
        if lower.startswith("s3://"):
            storage.resolve(uri)  # malformed (s3:// without a bucket) raises ValueError
            return "read", uri
        if lower.startswith("file://"):
            uri = uri[len("file://"):]
            if not uri.startswith("/"):
                return REFUSED, None
        elif "://" in uri:
            return REFUSED, None  # a scheme we do not read (gs://, ftp://, ...)
        if storage.is_s3(root):
            _, root_key = storage.resolve(root)
            if uri.startswith("/"):
                return REFUSED, None  # a worker's local file is never part of an S3 dataset
            key = posixpath.normpath(posixpath.join(root_key, uri))
            return ("read", f"s3://{key}") if key.startswith(root_key + "/") else (REFUSED, None)
        # realpath resolves `..` and every symlink, so a link inside the root pointing out is caught.
        real_root = os.path.realpath(storage.resolve(root)[1])
        real = os.path.realpath(uri if os.path.isabs(uri) else os.path.join(real_root, uri))
        return ("read", real) if _inside(real, real_root) else (REFUSED, None)
    except ValueError:  # embedded NUL bytes, malformed URIs
        return REFUSED, None


def read_image_bytes(uri: str) -> tuple[str, bytes | None]:
    """(status, bytes) for a located image: OK with the bytes, or MISSING / CORRUPT / UNREADABLE."""
    try:
        if not storage.is_s3(uri):
            # Regular files only: a directory, FIFO or device named *.png must not block or be slurped.
            if not os.path.isfile(uri):
                return MISSING, None
            if os.path.getsize(uri) > MAX_IMAGE_BYTES:
                return CORRUPT, None
            with open(uri, "rb") as f:
                return OK, f.read()
        fs, path = storage.resolve(uri)

        def read() -> tuple[str, bytes | None]:
            with fs.open_input_file(path) as f:  # one HEAD (for the size) + one GET
                if f.size() > MAX_IMAGE_BYTES:
                    return CORRUPT, None
                return OK, f.read()

        return storage.with_retries(read, f"read {uri}", attempts=3)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return MISSING, None
    except (OSError, pa.ArrowException) as err:
        log.warning("image %s unreadable: %s", uri, err)
        return UNREADABLE, None


def load_image(image_uri: str | None, root: str, size: int) -> tuple[str, bytes | None]:
    """image_uri -> (status, decoded (size, size, 3) uint8 pixels as bytes, or None)."""
    from speeder.encoders import decode_image

    status, uri = locate_image(image_uri, root)
    if uri is None:
        return status, None
    status, data = read_image_bytes(uri)
    if data is None:
        return status, None
    pixels = decode_image(data, size)
    return (OK, pixels.tobytes()) if pixels is not None else (CORRUPT, None)


def decode_images(batch: pa.Table, root: str, image_size: int) -> pa.Table:
    """Ray Data task: image_uri -> `image` (decoded pixels, nullable) + `image_status`."""
    uris = batch.column(schema.IMAGE_URI).to_pylist()
    if len(uris) > 1:
        with ThreadPoolExecutor(min(IMAGE_READERS, len(uris))) as pool:
            loaded = list(pool.map(lambda u: load_image(u, root, image_size), uris))
    else:
        loaded = [load_image(u, root, image_size) for u in uris]
    batch = batch.drop_columns([schema.IMAGE_URI])
    batch = batch.append_column(IMAGE, pa.array([px for _, px in loaded], pa.binary()))
    return batch.append_column(IMAGE_STATUS, pa.array([s for s, _ in loaded], pa.string()))


def drop_known(batch: pa.Table, known: np.ndarray) -> pa.Table:
    """Ray Data task for incremental runs: keep the items whose id is not in `known`."""
    ids = batch.column(schema.ITEM_ID).to_numpy()
    return batch.filter(pa.array(~np.isin(ids, known)))


# -- encoder actors ---------------------------------------------------------------------------------
def _device(num_gpus: float) -> str:
    import torch

    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


class TextEmbedder:
    """Ray Data actor: text (falling back to title when blank) -> text_emb. The model loads once."""

    def __init__(self, encoder: str, num_gpus: float = 0.0, backbone: dict[str, Any] | None = None) -> None:
        device = _device(num_gpus)
        if encoder == "backbone":
            from speeder.backbone import load_backbone
            from speeder.encoders import BackboneTextEncoder

            assert backbone is not None
            loaded = load_backbone(backbone["name"], num_layers=backbone["num_layers"], dtype=backbone["dtype"])
            loaded.model.to(device).eval()
            self.encoder = BackboneTextEncoder(loaded.model, loaded.tokenizer, name=f"backbone:{backbone['name']}")
        else:
            from speeder.encoders import build_text_encoder

            self.encoder = build_text_encoder(encoder, device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column(schema.TEXT).to_pylist()
        titles = (batch.column(schema.TITLE).to_pylist() if schema.TITLE in batch.column_names
                  else [None] * len(texts))
        inputs = [t if t and t.strip() else (title or "") for t, title in zip(texts, titles, strict=True)]
        emb = self.encoder(inputs)  # (B, d)
        has_text = pa.array([bool(t and t.strip()) for t in texts])
        batch = batch.drop_columns([c for c in (schema.TEXT, schema.TITLE) if c in batch.column_names])
        return batch.append_column(schema.TEXT_EMB, list_column(emb)).append_column("has_text", has_text)


class ImageEmbedder:
    """Ray Data actor: decoded `image` pixels -> image_emb (null where there is no image)."""

    def __init__(self, encoder: str, image_size: int, num_gpus: float = 0.0) -> None:
        from speeder.encoders import EfficientNetLite0Encoder, build_vision_encoder

        device = _device(num_gpus)
        self.size = image_size
        # EfficientNet runs at any resolution: at the decode size, not upsampled to its default 224.
        self.encoder = (EfficientNetLite0Encoder(device=device, image_size=image_size)
                        if encoder == "efficientnet-lite0" else build_vision_encoder(encoder, device))
        if self.encoder is None:
            raise ValueError("featurize.vision_encoder: 'none' needs no vision actors")

    def __call__(self, batch: pa.Table) -> pa.Table:
        shape = (self.size, self.size, 3)
        images = [None if b is None else np.frombuffer(b, np.uint8).reshape(shape)
                  for b in batch.column(IMAGE).to_pylist()]
        feats, mask = self.encoder(images)  # (B, d), (B,)
        batch = batch.drop_columns([IMAGE])
        return batch.append_column(schema.IMAGE_EMB, list_column(feats, mask))


def status_counts(column: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    """Counts of each image status (every status listed, zeros included)."""
    counts = dict.fromkeys(IMAGE_STATUSES, 0)
    for row in pc.value_counts(column).to_pylist():
        counts[row["values"]] = counts.get(row["values"], 0) + int(row["counts"])
    return counts
