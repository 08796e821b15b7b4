"""Small inputs handed to Ray Data from the driver: the size rule and the blocks."""

from __future__ import annotations

import pyarrow as pa

from speeder_platform import storage, tables


def test_in_blocks_cuts_every_row_once_in_order() -> None:
    table = pa.table({"x": list(range(10))})
    blocks = tables.in_blocks(table, 4)
    assert [b.num_rows for b in blocks] == [4, 4, 2]
    assert pa.concat_tables(blocks).equals(table)
    assert [b.num_rows for b in tables.in_blocks(table.slice(0, 0), 4)] == [0]  # an empty input: one empty block
    assert len(tables.in_blocks(table, 0)) == 10  # never a zero-row step


def test_is_small_follows_the_bytes_on_storage(tmp_path, monkeypatch) -> None:
    uri = str(tmp_path / "t.parquet")
    storage.write_table(pa.table({"x": list(range(1000))}), uri)
    size = storage.size(uri)
    assert tables.is_small(uri)
    monkeypatch.setattr(tables, "SMALL_TABLE_BYTES", size - 1)
    assert not tables.is_small(uri)
    assert tables.is_small(str(tmp_path / "missing.parquet"))  # nothing there: read by the driver, which names it
