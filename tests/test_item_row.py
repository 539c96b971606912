"""The item row's named shape: :class:`scrapy_ingest.schema.ItemRow` names the columns of every
items table, in order (the crawl tests read each column the pipeline fills)."""

from __future__ import annotations

import pytest

from scrapy_ingest.schema import ItemRow, table_spec


@pytest.mark.parametrize("name", [None, "products"])
def test_item_row_names_the_columns_of_every_items_table_in_order(name: str | None) -> None:
    assert ItemRow._fields == table_spec("items", "ingest_", name=name).column_names


def test_item_row_keeps_the_json_last_where_packed_batches_put_its_end() -> None:
    # Batch.rows cuts each row's JSON out of the payload at the offset in its last column
    assert ItemRow._fields[-1] == "data"
