"""Pydantic models of the test site's catalog, for the validation tests
(``INGEST_ITEM_SCHEMAS = {"CatalogProduct": "_schemas.Product"}``; crawl subprocesses run
from ``tests/``, so this module imports as ``_schemas``)."""

from __future__ import annotations

from datetime import datetime  # noqa: TC003 (pydantic reads the annotations at run time)
from decimal import Decimal  # noqa: TC003 (pydantic reads the annotations at run time)

from pydantic import BaseModel, Field, field_validator


class Product(BaseModel):
    """Coerces: the price text becomes a Decimal, ``sku-7`` an int 7, the ISO text of
    ``seen_at`` a datetime."""

    sku: int
    name: str
    price: Decimal
    url: str
    seen_at: datetime

    @field_validator("sku", mode="before")
    @classmethod
    def _number(cls, value: object) -> object:
        if isinstance(value, str) and value.startswith("sku-"):
            return value[len("sku-") :]
        return value


class CheapProduct(BaseModel):
    """Rejects every product dearer than 14: ``price`` must be below 15."""

    sku: str
    name: str
    price: Decimal = Field(lt=15)
    url: str
    seen_at: str
