"""Amazon Reviews importer: the 2018 release (Ni et al.) and the 2023 release (Hou et al.).

    speeder data prepare amazon2023 --raw data/All_Beauty --images data/All_Beauty/img --out runs/beauty

`raw` is a folder (local or s3://) holding exactly one reviews file and one meta file: JSON lines
named *.json / *.jsonl, optionally gzipped (*.json.gz, *.jsonl.gz). The meta file is the one whose
name contains "meta" (case-insensitive), the reviews file is the other one; hidden files are ignored.
Anything else is refused with a message naming the folder and the files found.

Fields read:
- 2018 reviews: reviewerID, asin, unixReviewTime (seconds), overall (optional);
  meta: asin, title, feature, description (list or str), imageURLHighRes / imageURL (lists).
- 2023 reviews: user_id, parent_asin, timestamp (milliseconds), rating (optional);
  meta: parent_asin, title, features, description, images (list of {large, hi_res, thumb, variant}).

Malformed lines (bad JSON, a missing or wrongly typed required field, an id that is not valid
Unicode, a .gz cut short) are counted per reason and skipped, never fatal. Optional fields of an
unexpected type are ignored. Odd Unicode in text (control characters, lone surrogates, bidi
overrides, zero-width spaces) is removed and the text NFC-normalised; over-long titles and texts are
cut at a word boundary. Such repaired records are kept and counted per reason (`repaired` in the
prepare report).
Items without a usable meta record (none, or no title) are dropped with their interactions before
the k-core: a language-model recommender cannot describe an item it only knows by ASIN. Both counts
appear in the prepare report.
title: HTML stripped, whitespace normalised, at most MAX_TITLE_CHARS.
text = title + features + description, HTML stripped, whitespace normalised, at most MAX_TEXT_CHARS.
Images: with `images` (a folder of <asin>.<ext>), the file is copied into the dataset; otherwise the
first image URL is kept as an absolute URI (later stages, offline, count it as missing).
"""

from __future__ import annotations

import html
import json
import logging
import posixpath
import re
import unicodedata
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np

from speeder_platform import storage
from speeder_platform.data.raw import MalformedLines, RawDataset, RawItem

log = logging.getLogger(__name__)

JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif")  # preference order when an ASIN has several
MAX_TEXT_CHARS = 2000  # long descriptions add tokens to the text encoder, not signal
MAX_TITLE_CHARS = 300  # longer "titles" are descriptions in the wrong field (or spam)
MAX_FIELD_CHARS = 50_000  # a raw field is cut to this before any cleaning: bounded work per record
CHUNK = 1 << 20
_TAG = re.compile(r"<[^<>]*>")  # no '<' inside: linear time even on a field full of '<'
# Control characters (C0 but whitespace, DEL, C1), zero-width space, bidi embeddings, overrides and
# isolates, BOM, noncharacters and lone surrogates: invisible, or able to reorder what a page shows.
_UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u202a-\u202e\u2066-\u2069"
                     "\ufeff\ufffe\uffff\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads accepts lone ones; UTF-8 cannot encode them


@dataclass(frozen=True)
class AmazonFormat:
    user: str
    item: str
    time: str
    rating: str
    time_divisor: int  # source units per second
    meta_item: str


FORMATS = {
    "amazon2018": AmazonFormat("reviewerID", "asin", "unixReviewTime", "overall", 1, "asin"),
    "amazon2023": AmazonFormat("user_id", "parent_asin", "timestamp", "rating", 1000, "parent_asin"),
}


def find_files(raw: str) -> tuple[str, str]:
    """(reviews URI, meta URI) inside `raw`, by the naming rule in the module docstring."""
    if not storage.is_dir(raw):
        raise FileNotFoundError(f"{raw}: not a folder (expected one reviews file and one meta file)")
    names = [n for n in storage.listdir(raw) if not n.startswith(".") and n.lower().endswith(JSON_SUFFIXES)]
    meta = [n for n in names if "meta" in n.lower()]
    reviews = [n for n in names if "meta" not in n.lower()]
    if len(meta) != 1 or len(reviews) != 1:
        raise ValueError(
            f"{raw}: expected exactly one reviews file and one meta file (JSON lines "
            f"{', '.join(JSON_SUFFIXES)}; the meta file's name contains 'meta'), "
            f"found reviews {reviews} and meta {meta}"
        )
    return storage.join(raw, reviews[0]), storage.join(raw, meta[0])


def iter_lines(uri: str, bad: MalformedLines) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of a file, gunzipped when its name ends in .gz.

    A gzip stream that is cut short or corrupt ends the file there: counted once as "truncated_gzip"
    at the line that could not be read; the lines before it are yielded.
    """
    fs, path = storage.resolve(uri)
    gz = uri.lower().endswith(".gz")
    line_no = 0
    pending = b""
    with fs.open_input_stream(path, compression=None) as stream:
        inflate = zlib.decompressobj(wbits=31) if gz else None
        try:
            while chunk := stream.read(CHUNK):
                if inflate is not None:
                    data = inflate.decompress(chunk)
                    while inflate.eof and inflate.unused_data:  # concatenated gzip members
                        rest = inflate.unused_data
                        inflate = zlib.decompressobj(wbits=31)
                        data += inflate.decompress(rest)
                    chunk = data
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    line_no += 1
                    yield line_no, line
            if inflate is not None and not inflate.eof:
                raise EOFError("compressed stream ended before its end marker")
        except (EOFError, zlib.error) as err:
            bad.add("truncated_gzip", line_no + 1)
            log.warning("%s: gzip stream cut short or corrupt after line %d (%s)", uri, line_no, err)
            return
    if pending:
        yield line_no + 1, pending


def _records(uri: str, bad: MalformedLines) -> Iterator[tuple[int, dict[str, Any]]]:
    for line_no, line in iter_lines(uri, bad):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            bad.add("bad_json", line_no)
            continue
        if not isinstance(record, dict):
            bad.add("wrong_type", line_no)
            continue
        yield line_no, record


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def parse_reviews(uri: str, fmt: AmazonFormat) -> tuple[list[str], list[str], list[int], list[float],
                                                         MalformedLines]:
    """(users, items, timestamps, ratings (NaN when absent), malformed-line counts) in file order."""
    bad = MalformedLines("reviews")
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    ratings: list[float] = []
    for line_no, rec in _records(uri, bad):
        user, item, raw_time = rec.get(fmt.user), rec.get(fmt.item), rec.get(fmt.time)
        if user in (None, "") or item in (None, "") or raw_time is None:
            bad.add("missing_field", line_no)
            continue
        timestamp = _as_int(raw_time)
        rating = rec.get(fmt.rating)
        bad_rating = rating is not None and (isinstance(rating, bool) or not isinstance(rating, (int, float)))
        if not isinstance(user, str) or not isinstance(item, str) or timestamp is None or bad_rating:
            bad.add("wrong_type", line_no)
            continue
        if _SURROGATE.search(user) or _SURROGATE.search(item):
            bad.add("bad_unicode", line_no)
            continue
        users.append(user)
        items.append(item)
        times.append(timestamp)
        ratings.append(float("nan") if rating is None else float(rating))
    return users, items, times, ratings, bad


def clean_text(value: str) -> str:
    """HTML entities decoded, tags and unsafe code points removed, whitespace collapsed, NFC."""
    text = _UNSAFE.sub("", _TAG.sub(" ", html.unescape(value[:MAX_FIELD_CHARS])))
    return unicodedata.normalize("NFC", " ".join(text.split()))


def has_unsafe_text(value: str) -> bool:
    """Whether clean_text removes code points from `value` beyond markup and whitespace."""
    return _UNSAFE.search(html.unescape(value[:MAX_FIELD_CHARS])) is not None


def cut(text: str, limit: int) -> str:
    """`text` at most `limit` characters, cut at a word boundary when one is not too far back."""
    if len(text) <= limit:
        return text
    at = text.rfind(" ", 0, limit)
    return text[: at if at > limit // 2 else limit]


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def _http(value: Any) -> str | None:
    ok = isinstance(value, str) and value.startswith(("http://", "https://")) and not _UNSAFE.search(value)
    return value if ok else None


def image_url(rec: dict[str, Any]) -> str | None:
    """The first usable image URL of a 2018 or 2023 meta record (2023: `large` first, a stable size)."""
    for key in ("imageURLHighRes", "imageURL"):  # 2018
        for url in _strings(rec.get(key)):
            if _http(url):
                return url
    images = rec.get("images")  # 2023: a list of dicts; some exports hold a dict of lists instead
    if isinstance(images, dict):
        columns = {k: v for k, v in images.items() if isinstance(v, list)}
        images = [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=False)]
    for image in images if isinstance(images, list) else []:
        if isinstance(image, dict):
            for key in ("large", "hi_res", "thumb"):
                if url := _http(image.get(key)):
                    return url
    return None


def _text_fields(rec: dict[str, Any]) -> list[str]:
    return [s for key in ("features", "feature", "description") for s in _strings(rec.get(key))]


def item_text(title: str, rec: dict[str, Any]) -> tuple[str, bool]:
    """(title + features + description cleaned and cut to MAX_TEXT_CHARS, whether it was cut).

    Fields stop being read once the text is long enough, so a huge field costs no more than a short one.
    """
    parts: list[str] = []
    size = len(title)
    for raw in _text_fields(rec):
        if size > MAX_TEXT_CHARS:
            break
        if part := clean_text(raw):
            parts.append(part)
            size += len(part) + 1
    text = f"{title}{' ' if title[-1] in '.!?' else '. '}{' '.join(parts)}" if parts else title
    return cut(text, MAX_TEXT_CHARS), len(text) > MAX_TEXT_CHARS


def parse_meta(uri: str, fmt: AmazonFormat, wanted: set[str]
               ) -> tuple[dict[str, RawItem], MalformedLines, MalformedLines]:
    """Catalog records of the `wanted` items (image: the first URL), malformed-line counts (skipped)
    and repaired-line counts (kept, cleaned)."""
    bad = MalformedLines("meta")
    repaired = MalformedLines("meta")
    found: dict[str, RawItem] = {}
    for line_no, rec in _records(uri, bad):
        item = rec.get(fmt.meta_item)
        if item in (None, ""):
            bad.add("missing_field", line_no)
            continue
        if not isinstance(item, str):
            bad.add("wrong_type", line_no)
            continue
        if item not in wanted:
            continue
        if item in found:
            bad.add("duplicate", line_no)
            continue
        raw_title = rec.get("title")
        if raw_title is not None and not isinstance(raw_title, str):
            bad.add("wrong_type", line_no)
            continue
        raw_title = raw_title or ""
        full_title = clean_text(raw_title)
        if not full_title:
            bad.add("missing_title", line_no)
            continue
        title = cut(full_title, MAX_TITLE_CHARS)
        text, text_cut = item_text(title, rec)
        flags = {"unicode_repaired": any(has_unsafe_text(f) for f in [raw_title, *_text_fields(rec)]),
                 "title_truncated": title != full_title, "text_truncated": text_cut}
        for reason in (r for r, hit in flags.items() if hit):
            repaired.add(reason, line_no)
        found[item] = RawItem(title, text, image_url=image_url(rec))
    return found, bad, repaired


def image_files(images: str) -> dict[str, str]:
    """{asin: file name} of the <asin>.<ext> files in an images folder (IMAGE_EXTS, preferred first)."""
    if not storage.is_dir(images):
        raise FileNotFoundError(f"{images}: images folder not found")
    ranked = []
    for name in storage.listdir(images):
        stem, _, ext = name.rpartition(".")
        if stem and f".{ext.lower()}" in IMAGE_EXTS:
            ranked.append((stem, IMAGE_EXTS.index(f".{ext.lower()}"), name))
    by_stem: dict[str, str] = {}
    for stem, _, name in sorted(ranked):
        by_stem.setdefault(stem, name)
    return by_stem


def load_amazon(source: str, raw: str | None, images: str | None = None) -> RawDataset:
    """Parse an Amazon Reviews folder (`source` is amazon2018 or amazon2023)."""
    fmt = FORMATS[source]
    if raw is None:
        raise ValueError(f"prepare.raw: {source} needs --raw FOLDER with one reviews file and one meta file")
    reviews_uri, meta_uri = find_files(raw)
    users, items, times, ratings, bad_reviews = parse_reviews(reviews_uri, fmt)
    bad_reviews.warn(log, reviews_uri)
    if not users:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(bad_reviews.counts.items())) or "empty file"
        raise ValueError(f"{reviews_uri}: no valid {source} reviews ({reasons}); "
                         f"expected fields {fmt.user}, {fmt.item}, {fmt.time}")
    catalog, bad_meta, repaired = parse_meta(meta_uri, fmt, set(items))
    bad_meta.warn(log, meta_uri)
    if repaired.counts:
        log.info("%s: kept %d record(s) after cleaning: %s", meta_uri, repaired.total(),
                 ", ".join(f"{r} {n}" for r, n in sorted(repaired.counts.items())))
    files = {item: name for item, name in (image_files(images) if images else {}).items() if item in catalog}
    for item, name in files.items():  # a local file wins over a URL
        catalog[item] = replace(catalog[item], image_url=None, image_ext="." + name.rpartition(".")[2].lower(),
                                image_loader=partial(storage.read_bytes, storage.join(images, name)))
    log.info("%s: %d reviews, %d of %d reviewed items have meta, %d image files", source, len(users),
             len(catalog), len(set(items)), len(files))
    return RawDataset(
        source=source, origin=raw, user_ids=users, item_ids=items, timestamps=np.asarray(times, np.int64),
        ratings=np.asarray(ratings, np.float64), catalog=catalog, timestamp_divisor=fmt.time_divisor,
        skipped=bad_reviews.prefixed() + bad_meta.prefixed(), repaired=repaired.prefixed(),
        extra_meta={"files": {"reviews": posixpath.basename(reviews_uri),
                              "meta": posixpath.basename(meta_uri)}},
    )
