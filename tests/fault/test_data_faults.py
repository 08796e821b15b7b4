"""Bulk data under fault: a hostile Amazon export is imported with every fault counted and no valid
record lost; a catalog of bad images is featurized with every bad image counted and none read.
(Malformed lines, a truncated .gz and bad images have their own tests in tests/platform.)"""

from __future__ import annotations

import pytest

from speeder import schema
from speeder_platform import storage
from speeder_platform.bench.faults.data import (
    BAD_STATUS,
    CORE_ITEMS,
    CORE_USERS,
    PER_USER,
    data_import,
    featurize_bad_images,
)
from speeder_platform.data.amazon import MAX_TITLE_CHARS

pytestmark = pytest.mark.fault


def test_hostile_amazon_export_is_counted_and_nothing_is_lost(ws) -> None:
    result = data_import(ws)
    assert result["passed"] and not result["data_lost"], result["observed"]
    details = result["details"]
    assert details["kept"] == (CORE_USERS, CORE_ITEMS, CORE_USERS * PER_USER)
    assert details["skipped"]["reviews:bad_unicode"] == 1 and details["skipped"]["reviews:truncated_gzip"] == 1
    assert details["repaired"] == {"meta:text_truncated": 2, "meta:title_truncated": 1, "meta:unicode_repaired": 1}
    assert details["problems"] == []
    assert result["seconds"] < 60  # a 1 MB title, a 5 MB description and 200 KB of '<' cost little

    items = storage.read_table(storage.join(ws.path("amazon-data"), schema.ITEMS_FILE)).to_pylist()
    assert items[0][schema.TITLE] == "Serum zerowidth 😀 créme"  # controls, bidi, BOM, ZWSP gone; NFC
    assert len(items[1][schema.TITLE]) <= MAX_TITLE_CHARS and items[1][schema.TITLE].startswith("Huge title word")
    assert items[2][schema.TEXT].startswith("Item 2. <a<a")  # the '<' flood is text, kept and cut


@pytest.mark.integration
def test_bad_images_are_counted_and_every_item_keeps_its_features(ws, ray_local) -> None:
    result = featurize_bad_images(ws)  # prepares its own catalog in ws.path("data"), over the fixture's
    assert result["passed"] and not result["data_lost"], result["observed"]
    assert result["details"]["image_status"] == result["details"]["expected"]
    assert {k: v for k, v in result["details"]["image_status"].items() if k != "ok"} == BAD_STATUS
