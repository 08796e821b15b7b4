"""Synthetic multimodal catalog (docs/data.md#synthetic): each modality carries a signal the others lack.

    speeder data prepare synthetic --out runs/syn/data synthetic.num_users=500

- Every item has a category, stated in its title and text ("Lamp #12: a lamp for the home. ..."),
  and a colour that appears only in its PNG image (a filled shape on a light background), never in
  the text. Items are grouped by (category, colour).
- Every item has a fixed successor in its group (a random cycle through the group): an item-level
  rule that only a sequence model can learn.
- Every user prefers one group. A sequence starts in it; each next item is, with probability
  `markov_strength`, the successor of the previous item, otherwise a random item of the preferred
  group, or (a weaker, second preference) of any group sharing its category or its colour once the
  group is used up; with probability NOISE an item drawn from the whole catalog.
- A user never meets an item twice: the candidate protocol (negatives the user never interacted
  with) would otherwise give the target away whenever it repeats a history item.

So text narrows the next item to a category, vision to a colour, and the sequence pins the item.
Everything is a function of the SyntheticConfig, so `synthetic_catalog(cfg)` recomputes the ground
truth (category, colour, successor per item) of a prepared dataset from its meta.json.
"""

from __future__ import annotations

import colorsys
import io
import logging
from dataclasses import dataclass
from functools import partial

import numpy as np
from PIL import Image, ImageDraw

from speeder_platform.config import SyntheticConfig
from speeder_platform.data.raw import RawDataset, RawItem

log = logging.getLogger(__name__)

SOURCE = "synthetic"
NOISE = 0.05  # chance that the next item is drawn from the whole catalog
START_TIME = 1_700_000_000  # unix seconds of the first interaction
CATEGORIES = (  # (name, phrase): no colour words here, the text must not leak the image's colour
    ("lamp", "a lamp for the home"),
    ("mug", "a mug for hot drinks"),
    ("chair", "a chair for the desk"),
    ("backpack", "a backpack for daily trips"),
    ("sneaker", "a sneaker for running"),
    ("watch", "a watch for everyday wear"),
    ("notebook", "a notebook for ideas"),
    ("headphones", "headphones for music"),
    ("blanket", "a blanket for cold nights"),
    ("kettle", "a kettle for the kitchen"),
    ("umbrella", "an umbrella for rainy days"),
    ("bottle", "a bottle for water"),
)
ADJECTIVES = ("sturdy", "compact", "lightweight", "handmade", "classic", "modern", "durable", "simple",
              "cozy", "portable", "elegant", "practical")
COLOURS = (  # (name, RGB); more colours than this are spread evenly around the hue circle
    ("red", (215, 40, 40)),
    ("blue", (40, 80, 215)),
    ("green", (40, 165, 60)),
    ("yellow", (235, 205, 35)),
    ("magenta", (200, 45, 200)),
    ("cyan", (40, 195, 205)),
    ("orange", (240, 135, 25)),
    ("purple", (115, 55, 165)),
)
BACKGROUND = 236  # light grey, so every colour stands out


@dataclass
class SyntheticCatalog:
    """Ground truth of the generator, indexed by generator item index (source_id "item-<index>")."""

    category: np.ndarray  # (N,) int64
    colour: np.ndarray  # (N,) int64
    group: np.ndarray  # (N,) int64: category * num_colors + colour
    successor: np.ndarray  # (N,) int64, in the same group
    titles: list[str]
    texts: list[str]


def category_name(k: int) -> tuple[str, str]:
    if k < len(CATEGORIES):
        return CATEGORIES[k]
    return f"gadget{k}", f"a gadget of type {k}"


def colour_rgb(k: int, num_colors: int) -> tuple[int, int, int]:
    if num_colors <= len(COLOURS):
        return COLOURS[k][1]
    r, g, b = colorsys.hsv_to_rgb(k / num_colors, 0.8, 0.85)
    return int(r * 255), int(g * 255), int(b * 255)


def colour_names(num_colors: int) -> list[str]:
    """Names of the colours in use (for checks that the text never mentions them)."""
    return [name for name, _ in COLOURS[:num_colors]]


def item_source_id(index: int) -> str:
    return f"item-{index:05d}"


def synthetic_catalog(cfg: SyntheticConfig) -> SyntheticCatalog:
    """Categories, colours, successors, titles and texts of every item (deterministic in cfg.seed)."""
    rng = np.random.default_rng([cfg.seed, 0])
    n, num_groups = cfg.num_items, cfg.num_categories * cfg.num_colors
    group = rng.permutation(np.arange(n) % num_groups)  # balanced group sizes
    category, colour = group // cfg.num_colors, group % cfg.num_colors
    successor = np.arange(n)
    for g in range(num_groups):
        members = rng.permutation(np.flatnonzero(group == g))
        successor[members] = np.roll(members, -1)
    titles, texts = [], []
    for i in range(n):
        name, phrase = category_name(int(category[i]))
        adjective = ADJECTIVES[int(rng.integers(len(ADJECTIVES)))]
        title = f"{name.capitalize()} #{i}"
        titles.append(title)
        texts.append(f"{title}: {phrase}. A {adjective} {name}, model {i}.")
    return SyntheticCatalog(category=category, colour=colour, group=group, successor=successor, titles=titles,
                            texts=texts)


def render_image(index: int, rgb: tuple[int, int, int], size: int, seed: int) -> bytes:
    """PNG bytes: a filled ellipse or rectangle in `rgb` on a light noisy background.

    Position, size, shade and noise vary per item, so no two images are byte-identical.
    """
    rng = np.random.default_rng([seed, 1, index])
    image = Image.new("RGB", (size, size), (BACKGROUND,) * 3)
    radius = size * rng.uniform(0.22, 0.36)
    cx, cy = size / 2 + rng.uniform(-0.12, 0.12, size=2) * size
    fill = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in rgb)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    pixels = np.asarray(image, np.int16) + rng.integers(-6, 7, size=(size, size, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _pick(rng: np.random.Generator, pool: np.ndarray, seen: np.ndarray) -> int | None:
    free = pool[~seen[pool]]
    return int(free[rng.integers(len(free))]) if len(free) else None


def user_sequences(cfg: SyntheticConfig, catalog: SyntheticCatalog) -> list[list[int]]:
    """Item indices per user, in time order (see the module docstring for the rule)."""
    return generate_users(cfg, catalog)[0]


def generate_users(cfg: SyntheticConfig, catalog: SyntheticCatalog) -> tuple[list[list[int]], np.ndarray]:
    """-> each user's item indices in time order, and (U,) each user's preferred group: the generator's truth
    about every user (module docstring); `next_item_odds` gives the odds each draw was made with."""
    rng = np.random.default_rng([cfg.seed, 2])
    everything = np.arange(cfg.num_items)
    group = catalog.group
    groups = np.unique(group)  # fewer items than groups leaves some empty
    sequences, chosen = [], []
    for _ in range(cfg.num_users):
        g = int(groups[rng.integers(len(groups))])
        preferred, related = group_pools(cfg, catalog, g)
        length = min(int(rng.integers(cfg.min_length, cfg.max_length + 1)), cfg.num_items)
        seen = np.zeros(cfg.num_items, bool)
        items: list[int] = []
        while len(items) < length:
            draw = rng.random()
            nxt = None
            if draw < NOISE:
                nxt = _pick(rng, everything, seen)
            elif items and draw < NOISE + cfg.markov_strength and not seen[catalog.successor[items[-1]]]:
                nxt = int(catalog.successor[items[-1]])
            for pool in (preferred, related, everything):
                if nxt is None:
                    nxt = _pick(rng, pool, seen)
            assert nxt is not None  # length <= num_items
            seen[nxt] = True
            items.append(nxt)
        sequences.append(items)
        chosen.append(g)
    return sequences, np.asarray(chosen, np.int64)


def group_pools(cfg: SyntheticConfig, catalog: SyntheticCatalog, group: int) -> tuple[np.ndarray, np.ndarray]:
    """A group's items and its related pool (every item sharing its category or its colour), as item indices."""
    category, colour = divmod(group, cfg.num_colors)
    return (np.flatnonzero(catalog.group == group),
            np.flatnonzero((catalog.category == category) | (catalog.colour == colour)))


def next_item_odds(cfg: SyntheticConfig, catalog: SyntheticCatalog, group: int, prefix: list[int]) -> np.ndarray:
    """The exact probability of each item (N,) being drawn next by a user of preferred `group` after the items
    `prefix` (all of them, oldest first): the rule of `generate_users` written as odds. Seen items get 0.

    NOISE spread over the unseen items; markov_strength on the last item's successor if it is unseen; the rest
    spread over the first pool with unseen items among the preferred group, its related pool and everything.
    """
    seen = np.zeros(cfg.num_items, bool)
    seen[list(prefix)] = True
    odds = np.zeros(cfg.num_items)
    if seen.all():
        return odds
    odds[~seen] += NOISE / (~seen).sum()
    rest = 1.0 - NOISE
    if prefix and not seen[catalog.successor[prefix[-1]]]:
        odds[catalog.successor[prefix[-1]]] += cfg.markov_strength
        rest -= cfg.markov_strength
    for pool in (*group_pools(cfg, catalog, group), np.arange(cfg.num_items)):
        free = pool[~seen[pool]]
        if len(free):
            odds[free] += rest / len(free)
            break
    return odds


def load_synthetic(cfg: SyntheticConfig) -> RawDataset:
    """Generate the catalog and the interactions; images are rendered later, for surviving items only."""
    catalog = synthetic_catalog(cfg)
    sequences = user_sequences(cfg, catalog)
    rng = np.random.default_rng([cfg.seed, 3])
    missing = rng.random(cfg.num_items) < cfg.missing_image_rate
    items = {}
    for i in range(cfg.num_items):
        render = partial(render_image, i, colour_rgb(int(catalog.colour[i]), cfg.num_colors), cfg.image_size,
                         cfg.seed)
        items[item_source_id(i)] = RawItem(catalog.titles[i], catalog.texts[i],
                                           image_loader=None if missing[i] else render,
                                           image_ext=None if missing[i] else ".png")
    users, item_ids, times = [], [], []
    for u, seq in enumerate(sequences):
        t = START_TIME + int(rng.integers(0, 30 * 86400))
        for i in seq:
            t += int(rng.integers(60, 86400))  # strictly increasing per user
            users.append(f"user-{u:05d}")
            item_ids.append(item_source_id(i))
            times.append(t)
    log.info("synthetic: %d users, %d items, %d interactions, %d items without image", cfg.num_users,
             cfg.num_items, len(users), int(missing.sum()))
    return RawDataset(
        source=SOURCE, origin="generated", user_ids=users, item_ids=item_ids,
        timestamps=np.asarray(times, np.int64), ratings=np.full(len(users), np.nan), catalog=items,
    )
