"""MovieLens-100K importer: the GroupLens files, or the copy shipped inside the `recbole` wheel.

    speeder data prepare movielens-100k --out runs/ml100k/data                # recbole's copy
    speeder data prepare movielens-100k --raw ~/ml-100k --out runs/ml100k/data # u.data + u.item

Titles carry the year as GroupLens writes them ("Toy Story (1995)"); text adds the genres:
"Toy Story (1995). Genres: Animation, Children's, Comedy". source_id is the movie id; no images.
recbole is located on disk but never imported (its dependencies are not installed).
"""

from __future__ import annotations

import importlib.util
import logging
import os

import numpy as np

from speeder_platform import storage
from speeder_platform.data.raw import MalformedLines, RawDataset, RawItem

log = logging.getLogger(__name__)

SOURCE = "movielens-100k"
RECBOLE_DIR = ("dataset_example", "ml-100k")  # inside the installed recbole package
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
          "War", "Western")  # the order of u.item's 19 genre flags


def recbole_ml100k_dir() -> str:
    """The ml-100k folder inside the installed recbole package (found without importing it)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("recbole is not installed: pass --raw FOLDER holding u.data and u.item")
    for root in spec.submodule_search_locations:
        folder = os.path.join(root, *RECBOLE_DIR)
        if os.path.isfile(os.path.join(folder, "ml-100k.inter")):
            return folder
    raise FileNotFoundError(f"recbole is installed but has no {'/'.join(RECBOLE_DIR)}/ml-100k.inter")


def movie_text(title: str, genres: list[str]) -> str:
    genres = [g for g in genres if g != "unknown"]
    return f"{title}. Genres: {', '.join(genres)}" if genres else title


def _parse_interactions(data: str, where: str, skip_header: bool) -> tuple[list[str], list[str], list[int],
                                                                            list[float], MalformedLines]:
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    ratings: list[float] = []
    bad = MalformedLines("interactions")
    for line_no, line in enumerate(data.splitlines(), start=1):
        if (skip_header and line_no == 1) or not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 4:
            bad.add("field_count", line_no)
            continue
        if not (fields[0].strip() and fields[1].strip() and fields[3].strip()):
            bad.add("missing_field", line_no)
            continue
        try:
            rating, timestamp = float(fields[2]), float(fields[3])
            typed = timestamp.is_integer()
        except ValueError:
            typed = False
        if not typed:
            bad.add("wrong_type", line_no)
            continue
        users.append(fields[0].strip())
        items.append(fields[1].strip())
        times.append(int(timestamp))
        ratings.append(rating)
    bad.warn(log, where)
    return users, items, times, ratings, bad


def _recbole_catalog(data: str, where: str, bad: MalformedLines) -> dict[str, RawItem]:
    # item_id:token  movie_title:token_seq  release_year:token  class:token_seq (genres, space-separated)
    catalog = {}
    for line_no, line in enumerate(data.splitlines(), start=1):
        if line_no == 1 or not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 4 or not fields[0].strip() or not fields[1].strip():
            bad.add("field_count" if len(fields) != 4 else "missing_field", line_no)
            continue
        movie_id, name, year, genres = (f.strip() for f in fields)
        title = f"{name} ({year})" if year.isdigit() else name
        catalog[movie_id] = RawItem(title=title, text=movie_text(title, genres.split()))
    bad.warn(log, where)
    return catalog


def _grouplens_catalog(data: str, where: str, bad: MalformedLines) -> dict[str, RawItem]:
    # id | title | release date | video release date | IMDb URL | 19 genre flags
    catalog = {}
    for line_no, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) != 5 + len(GENRES):
            bad.add("field_count", line_no)
            continue
        if not fields[0].strip() or not fields[1].strip():
            bad.add("missing_field", line_no)
            continue
        flags = fields[5:]
        if any(f.strip() not in ("0", "1") for f in flags):
            bad.add("wrong_type", line_no)
            continue
        title = " ".join(fields[1].split())
        genres = [g for g, f in zip(GENRES, flags, strict=True) if f.strip() == "1"]
        catalog[fields[0].strip()] = RawItem(title=title, text=movie_text(title, genres))
    bad.warn(log, where)
    return catalog


def load_movielens(raw: str | None = None) -> RawDataset:
    """Parse ML-100K: `raw` is a folder (local or s3://) with u.data and u.item; None: recbole's copy."""
    if raw is None:
        folder = recbole_ml100k_dir()
        inter_uri, item_uri = os.path.join(folder, "ml-100k.inter"), os.path.join(folder, "ml-100k.item")
        origin = "recbole:dataset_example/ml-100k"
        inter_data = storage.read_bytes(inter_uri).decode("utf-8")
        item_data = storage.read_bytes(item_uri).decode("utf-8")
        skip_header = True
    else:
        inter_uri, item_uri = storage.join(raw, "u.data"), storage.join(raw, "u.item")
        for uri in (inter_uri, item_uri):
            if not storage.exists(uri):
                raise FileNotFoundError(f"{raw}: expected GroupLens u.data and u.item; {uri} is missing")
        origin = raw
        # GroupLens ships latin-1; decoding never fails, a garbled line is then counted as malformed.
        inter_data = storage.read_bytes(inter_uri).decode("latin-1")
        item_data = storage.read_bytes(item_uri).decode("latin-1")
        skip_header = False
    users, items, times, ratings, bad_inter = _parse_interactions(inter_data, inter_uri, skip_header)
    bad_items = MalformedLines("items")
    catalog = (_recbole_catalog if raw is None else _grouplens_catalog)(item_data, item_uri, bad_items)
    if not users:
        raise ValueError(f"{inter_uri}: no valid interaction lines")
    log.info("%s: %d interactions, %d catalog records from %s", SOURCE, len(users), len(catalog), origin)
    return RawDataset(
        source=SOURCE, origin=origin, user_ids=users, item_ids=items,
        timestamps=np.asarray(times, np.int64), ratings=np.asarray(ratings, np.float64), catalog=catalog,
        skipped=bad_inter.prefixed() + bad_items.prefixed(),
    )
