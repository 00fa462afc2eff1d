"""FunVoiceChat parts that need no Gemini: the catalogue, tool routing, configuration and set-up."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp import web

from edgevoice.app import build_app
from edgevoice.config import FunVoiceSettings, Settings
from edgevoice.funvoice.catalogue import Catalogue, CatalogueError, normalize
from edgevoice.funvoice.channels import Channels
from edgevoice.funvoice.gemini import GeminiService, LiveError
from edgevoice.funvoice.tools import Toolbox, declarations
from edgevoice.metrics import Metrics
from edgevoice.server.keys import HEALTH_SECTIONS
from tests.support.daemon import Daemon

PRODUCTS = [
    {"id": "pho-bo", "name": "Phở bò", "price": 65000, "description": "Beef noodle soup", "tags": ["beef", "soup"]},
    {"id": "pho-ga", "name": "Phở gà", "price": 60000, "description": "Chicken noodle soup"},
    {"id": "ca-phe", "name": "Cà phê sữa đá", "price": 30000, "category": "drinks"},
]


def write(tmp_path: Path, data: object, name: str = "catalogue.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def test_normalize_ignores_case_and_vietnamese_accents() -> None:
    assert normalize("Cà Phê Sữa Đá") == "ca phe sua da"


def test_catalogue_search_and_get(tmp_path: Path) -> None:
    cat = Catalogue(write(tmp_path, {"products": PRODUCTS}))
    assert cat.load() == 3
    assert [p["id"] for p in cat.search("pho")] == ["pho-bo", "pho-ga"]
    assert [p["id"] for p in cat.search("ca phe da")] == ["ca-phe"]
    assert [p["id"] for p in cat.search("beef soup")] == ["pho-bo"]  # every word, across fields
    assert [p["id"] for p in cat.search("pho-ga")] == ["pho-ga"]  # an exact id first
    assert cat.search("pizza") == []
    assert cat.get("pho-bo") == PRODUCTS[0]
    assert cat.get("phở gà") == PRODUCTS[1]  # an exact name works as an id
    assert cat.get("pho") is None


def test_catalogue_reloads_on_change_and_keeps_the_last_good_copy(tmp_path: Path) -> None:
    path = write(tmp_path, PRODUCTS[:1])  # a bare list is accepted too
    cat = Catalogue(path)
    cat.load()
    assert cat.get("pho-ga") is None
    write(tmp_path, PRODUCTS)
    import os

    os.utime(path, ns=(1, 1))  # make the change visible whatever the clock resolution
    assert cat.get("pho-ga") == PRODUCTS[1]
    path.write_text("{broken", encoding="utf-8")
    os.utime(path, ns=(2, 2))
    assert cat.get("pho-ga") == PRODUCTS[1]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"items": []}', "expected a list of products"),
        ('[{"id": "x"}]', "product #0 needs string fields 'id' and 'name'"),
        ('[{"id": "x", "name": "A"}, {"id": "x", "name": "B"}]', "product id 'x' appears twice"),
    ],
)
def test_bad_catalogue_names_the_file_and_the_problem(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "cat.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(CatalogueError, match=message) as info:
        Catalogue(path).load()
    assert str(path) in str(info.value)
    with pytest.raises(CatalogueError, match="cannot read it"):
        Catalogue(tmp_path / "missing.json").load()


def test_declarations_follow_the_configured_pages() -> None:
    free = {d["name"]: d for d in declarations([])}
    assert "enum" not in free["navigate_to_page"]["parameters"]["properties"]["page"]
    fixed = {d["name"]: d for d in declarations(["menu", "cart"])}
    assert fixed["navigate_to_page"]["parameters"]["properties"]["page"]["enum"] == ["menu", "cart"]
    assert set(fixed) == {"navigate_to_page", "show_product", "get_product_info"}


async def test_tool_errors_are_answers_for_the_model(tmp_path: Path) -> None:
    box = Toolbox(Channels(), Catalogue(None), ["menu"])
    assert (await box.call("u", "c1", "navigate_to_page", {"page": ""}))["status"] == "error"
    assert "unknown page 'bar'" in (await box.call("u", "c1", "navigate_to_page", {"page": "bar"}))["error"]
    assert "not connected" in (await box.call("u", "c1", "navigate_to_page", {"page": "menu"}))["error"]
    assert "no product catalogue" in (await box.call("u", "c2", "get_product_info", {"query": "pho"}))["error"]
    assert "unknown function 'fly'" in (await box.call("u", "c3", "fly", {}))["error"]
    assert "must be a non-empty string" in (await box.call("u", "c4", "show_product", {"product_id": 5}))["error"]


async def test_no_api_key_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("GEMINI_API_KEY", "GOOGLE_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    service = GeminiService(FunVoiceSettings(), Metrics())
    service.build_client()
    assert service.client is None and "no Gemini API key" in (service.status.error or "")
    with pytest.raises(LiveError) as info:
        async with service.session():
            pass
    assert info.value.code == "llm_not_configured" and info.value.fatal
    assert service.status.available is False


def test_api_version_and_base_url_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOOGLE_GENAI_API_VERSION", raising=False)
    monkeypatch.delenv("GOOGLE_GEMINI_BASE_URL", raising=False)
    service = GeminiService(FunVoiceSettings(), Metrics())
    assert service.api_version == "v1beta" and service.endpoint == "wss://generativelanguage.googleapis.com"
    monkeypatch.setenv("GOOGLE_GENAI_API_VERSION", "v1alpha")
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", "https://127.0.0.1:9")
    service = GeminiService(FunVoiceSettings(), Metrics())
    assert service.api_version == "v1alpha" and service.endpoint == "wss://127.0.0.1:9"
    service = GeminiService(FunVoiceSettings(api_version="v1", base_url="https://127.0.0.1:8"), Metrics())
    assert service.api_version == "v1" and service.endpoint == "wss://127.0.0.1:8"  # configuration wins


def test_disabled_bridge_serves_nothing() -> None:
    app = build_app(Settings(funvoice=FunVoiceSettings(enabled=False)))
    paths = {r.canonical for r in app.router.resources()}
    assert not paths & {"/ws", "/ws/tools", "/ws/product_info", "/connect", "/product-info-status"}
    assert "llm_service" not in app[HEALTH_SECTIONS]
    enabled = build_app(Settings())
    assert {"/ws", "/ws/tools", "/ws/product_info", "/connect", "/examples/voice.html"} <= {
        r.canonical for r in enabled.router.resources()
    }
    assert list(enabled[HEALTH_SECTIONS])[:4] == ["llm_service", "websockets", "sessions", "expected_latency"]
    assert isinstance(enabled, web.Application)


def test_bad_catalogue_stops_the_daemon_with_a_clear_message(
    tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    bad = tmp_path / "menu.json"
    bad.write_text('[{"id": "x"}]', encoding="utf-8")
    d = daemon_factory(config=f'[funvoice]\ncatalogue = "{bad}"\n', start=False)
    d.start(wait_ready=False)
    assert d.proc is not None and d.proc.wait(60) == 1
    assert f"funvoice.catalogue = '{bad}': product #0 needs string fields 'id' and 'name'" in d.log()
