"""The operator's product catalogue: a JSON file the lookup tools answer from.

The file holds a list of products, or ``{"products": [...]}``; each product is an object with at
least ``"id"`` and ``"name"`` (strings); any other fields (price, description, category, tags,
image, available, ...) are passed through to the model and the front end as they are. The file is
re-read when its modification time changes; a broken edit keeps the last good catalogue.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_SEARCH_FIELDS = ("id", "name", "description", "category", "tags")


class CatalogueError(Exception):
    """The catalogue file cannot be used; the message names the file and what is wrong."""


def normalize(text: str) -> str:
    """Case- and accent-insensitive form: "Phở Bò" -> "pho bo"."""
    decomposed = unicodedata.normalize("NFKD", text.replace("đ", "d").replace("Đ", "D"))
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def parse(path: Path, raw: bytes) -> list[dict[str, Any]]:
    """Validate the file's content into a list of products."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CatalogueError(f"funvoice.catalogue = {str(path)!r}: not valid JSON ({exc})") from None
    products = data.get("products") if isinstance(data, dict) else data
    if not isinstance(products, list):
        raise CatalogueError(
            f"funvoice.catalogue = {str(path)!r}: expected a list of products or {{'products': [...]}}"
        )
    seen: set[str] = set()
    for i, p in enumerate(products):
        if not isinstance(p, dict) or not isinstance(p.get("id"), str) or not isinstance(p.get("name"), str):
            raise CatalogueError(
                f"funvoice.catalogue = {str(path)!r}: product #{i} needs string fields 'id' and 'name'"
            )
        if p["id"] in seen:
            raise CatalogueError(f"funvoice.catalogue = {str(path)!r}: product id {p['id']!r} appears twice")
        seen.add(p["id"])
    return products


@dataclass
class _Loaded:
    mtime_ns: int
    products: list[dict[str, Any]]
    index: list[tuple[str, dict[str, Any]]]


class Catalogue:
    """Products from ``path`` (or none when no file is configured). Methods do file I/O: call them off the loop."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._loaded: _Loaded | None = None

    @property
    def configured(self) -> bool:
        return self.path is not None

    def load(self) -> int:
        """Read the file now; raise :class:`CatalogueError` when it is missing or invalid. Returns the product count."""
        if self.path is None:
            return 0
        try:
            stat = self.path.stat()
            raw = self.path.read_bytes()
        except OSError as exc:
            raise CatalogueError(f"funvoice.catalogue = {str(self.path)!r}: cannot read it ({exc.strerror})") from None
        products = parse(self.path, raw)
        index = [(normalize(" ".join(_text(p.get(f)) for f in _SEARCH_FIELDS)), p) for p in products]
        self._loaded = _Loaded(stat.st_mtime_ns, products, index)
        return len(products)

    def _current(self) -> _Loaded | None:
        if self.path is None:
            return None
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError as exc:
            log.error("catalogue %s: cannot stat it (%s); keeping the last good copy", self.path, exc.strerror)
            return self._loaded
        if self._loaded is None or mtime != self._loaded.mtime_ns:
            try:
                count = self.load()
                log.info("catalogue %s (re)loaded: %d products", self.path, count)
            except CatalogueError as exc:
                log.error("%s; keeping the last good copy", exc)
        return self._loaded

    def get(self, product_id: str) -> dict[str, Any] | None:
        """The product with this exact id, else the one whose name matches exactly (accents and case ignored)."""
        loaded = self._current()
        if loaded is None:
            return None
        for p in loaded.products:
            if p["id"] == product_id:
                return p
        wanted = normalize(product_id).strip()
        return next((p for p in loaded.products if normalize(p["name"]).strip() == wanted), None)

    def search(self, query: str, limit: int = 5) -> list[dict[str, Any]]:
        """Products whose id, name, description, category or tags contain every word of ``query``."""
        loaded = self._current()
        if loaded is None:
            return []
        exact = self.get(query)
        words = normalize(query).split()
        hits = [p for text, p in loaded.index if words and all(w in text for w in words) and p is not exact]
        return ([exact] if exact else []) + hits[: limit - (1 if exact else 0)]


def _text(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return "" if value is None else str(value)
