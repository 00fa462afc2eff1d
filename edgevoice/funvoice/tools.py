"""Function calling: what the model may do, and how each call reaches that user's front end.

Every call is pushed to the user's ``/ws/tools`` sockets as
``{"type": "tool_command", "command": NAME, "args": {...}, "call_id": ID, "timestamp": ...}``
(``show_product`` adds ``"product"``); product data also goes to ``/ws/product_info`` as
``{"type": "product_info", "source": NAME, "query": ..., "products": [...], "call_id": ID, "timestamp": ...}``.
The dict returned by :meth:`Toolbox.call` is the function response sent back to the model.
"""

from __future__ import annotations

import asyncio
from typing import Any

from edgevoice.funvoice.catalogue import Catalogue
from edgevoice.funvoice.channels import Channels, utc_now_iso

NAVIGATE = "navigate_to_page"
SHOW_PRODUCT = "show_product"
PRODUCT_INFO = "get_product_info"
_MAX_ARG = 200


def declarations(pages: list[str]) -> list[dict[str, Any]]:
    """Function declarations for ``LiveConnectConfig.tools`` (Gemini's OpenAPI-subset schemas)."""
    page: dict[str, Any] = {"type": "STRING", "description": "Page to open, e.g. menu, cart, checkout."}
    if pages:
        page["enum"] = list(pages)
    return [
        {
            "name": NAVIGATE,
            "description": "Open a page of the customer's ordering screen.",
            "parameters": {"type": "OBJECT", "properties": {"page": page}, "required": ["page"]},
        },
        {
            "name": SHOW_PRODUCT,
            "description": "Show one product from the restaurant's catalogue on the customer's screen.",
            "parameters": {
                "type": "OBJECT",
                "properties": {
                    "product_id": {"type": "STRING", "description": "The product's id (from get_product_info)."}
                },
                "required": ["product_id"],
            },
        },
        {
            "name": PRODUCT_INFO,
            "description": "Look up products in the restaurant's catalogue by name, id or keyword: "
            "price, description, availability and ids.",
            "parameters": {
                "type": "OBJECT",
                "properties": {"query": {"type": "STRING", "description": "Product name, id or keywords."}},
                "required": ["query"],
            },
        },
    ]


def _string_arg(args: dict[str, Any], name: str) -> str:
    value = args.get(name)
    if not isinstance(value, str) or not value.strip() or len(value) > _MAX_ARG:
        raise ValueError(f"argument {name!r} must be a non-empty string of at most {_MAX_ARG} characters")
    return value.strip()


class Toolbox:
    """Runs the model's function calls for one daemon; every effect is scoped to the calling user."""

    def __init__(self, channels: Channels, catalogue: Catalogue, pages: list[str]) -> None:
        self.channels = channels
        self.catalogue = catalogue
        self.pages = list(pages)

    async def call(self, user_id: str, call_id: str, name: str, args: dict[str, Any] | None) -> dict[str, Any]:
        """Run one call and return the response for the model (errors are responses too, never exceptions)."""
        args = dict(args or {})
        try:
            if name == NAVIGATE:
                return await self._navigate(user_id, call_id, args)
            if name == SHOW_PRODUCT:
                return await self._show_product(user_id, call_id, args)
            if name == PRODUCT_INFO:
                return await self._product_info(user_id, call_id, args)
        except ValueError as exc:
            return {"status": "error", "error": str(exc)}
        return {"status": "error", "error": f"unknown function {name!r}"}

    async def cancelled(self, user_id: str, call_ids: list[str]) -> None:
        """Tell the user's screens that the model withdrew these calls (they may undo them)."""
        await self.channels.push(
            "tools", user_id, {"type": "tool_cancelled", "call_ids": call_ids, "timestamp": utc_now_iso()}
        )

    def _command(self, name: str, args: dict[str, Any], call_id: str, **extra: Any) -> dict[str, Any]:
        return {
            "type": "tool_command",
            "command": name,
            "args": args,
            "call_id": call_id,
            "timestamp": utc_now_iso(),
            **extra,
        }

    async def _navigate(self, user_id: str, call_id: str, args: dict[str, Any]) -> dict[str, Any]:
        page = _string_arg(args, "page")
        if self.pages and page not in self.pages:
            raise ValueError(f"unknown page {page!r}; pages: {', '.join(self.pages)}")
        screens = await self.channels.push("tools", user_id, self._command(NAVIGATE, {"page": page}, call_id))
        if not screens:
            return {"status": "error", "error": "the customer's screen is not connected; describe it in words"}
        return {"status": "ok", "page": page}

    async def _show_product(self, user_id: str, call_id: str, args: dict[str, Any]) -> dict[str, Any]:
        product_id = _string_arg(args, "product_id")
        product: dict[str, Any] | None = None
        if self.catalogue.configured:
            product = await asyncio.to_thread(self.catalogue.get, product_id)
            if product is None:
                raise ValueError(f"no product {product_id!r} in the catalogue; find ids with {PRODUCT_INFO}")
            product_id = product["id"]
        command = self._command(SHOW_PRODUCT, {"product_id": product_id}, call_id, product=product)
        screens = await self.channels.push("tools", user_id, command)
        if product is not None:
            await self._push_products(user_id, call_id, SHOW_PRODUCT, product_id, [product])
        if not screens:
            return {"status": "error", "error": "the customer's screen is not connected; describe it in words"}
        return {"status": "ok", "product": product or {"id": product_id}}

    async def _product_info(self, user_id: str, call_id: str, args: dict[str, Any]) -> dict[str, Any]:
        query = _string_arg(args, "query")
        if not self.catalogue.configured:
            return {"status": "error", "error": "no product catalogue is configured on this box"}
        products = await asyncio.to_thread(self.catalogue.search, query)
        await self._push_products(user_id, call_id, PRODUCT_INFO, query, products)
        if not products:
            return {"status": "not_found", "query": query, "products": []}
        return {"status": "ok", "query": query, "products": products}

    async def _push_products(
        self, user_id: str, call_id: str, source: str, query: str, products: list[dict[str, Any]]
    ) -> int:
        message = {
            "type": "product_info",
            "source": source,
            "query": query,
            "products": products,
            "call_id": call_id,
            "timestamp": utc_now_iso(),
        }
        return await self.channels.push("product_info", user_id, message)
