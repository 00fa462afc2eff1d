"""One configuration: a TOML file, overridden key by key from the environment.

Lookup order for the file: ``--config FILE``, else ``$EDGEVOICE_CONFIG``, else
``/etc/edgevoice/edgevoice.toml`` when it exists, else the embedded defaults.
Every key can be overridden as ``EDGEVOICE_<SECTION>__<KEY>`` (pydantic-settings'
convention); the environment wins over the file. Settings are validated once
into frozen models; :class:`ConfigError` names the file, the key, the bad value
and what is allowed.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from edgevoice.errors import IDENTIFIER_PATTERN

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Jetson ships Python 3.10
    import tomli as tomllib

ENV_PREFIX = "EDGEVOICE_"
DEFAULT_CONFIG_PATH = Path("/etc/edgevoice/edgevoice.toml")


log = logging.getLogger(__name__)


class ConfigError(Exception):
    """The configuration cannot be used; the message is meant for an operator."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


def _read_secret(value: SecretStr | None, path: Path | None, file_key: str) -> str | None:
    if value is not None and value.get_secret_value():
        return value.get_secret_value()
    if path is None:
        return None
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{file_key} = {str(path)!r}: cannot read it ({exc.strerror})") from None
    if not secret:
        raise ConfigError(f"{file_key} = {str(path)!r}: the file is empty")
    return secret


Surface = Literal["multicam", "seats", "dashboard", "metrics", "funvoice"]
"""A group of endpoints guarded by one token (see docs/security.md):

- ``multicam``: ``/asr-multicam`` (audio in, customer events out);
- ``seats``: ``/streams/{stream_id}/start|stop`` (the POS binds customers to mic seats);
- ``dashboard``: ``/dashboard/feed`` (every table's live transcripts);
- ``metrics``: ``/metrics``;
- ``funvoice``: ``/ws``, ``/ws/tools``, ``/ws/product_info``, ``/connect``, the product-info endpoints and
  ``/health`` (the FunVoiceChat front ends, which send no token: guarded by the Origin and Host checks).
"""
SURFACES: tuple[Surface, ...] = ("multicam", "seats", "dashboard", "metrics", "funvoice")
LAN_GUARDED: tuple[Surface, ...] = ("multicam", "seats", "dashboard", "metrics")
"""Surfaces that must have a token before the daemon listens beyond loopback (unless allow_insecure_lan)."""


def is_loopback_host(host: str) -> bool:
    """Whether listening on ``host`` reaches this machine only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a name that may resolve anywhere, or "" (every interface)


class ServerSettings(_Section):
    """Where the daemon listens and how it guards the LAN (docs/security.md)."""

    host: str = "127.0.0.1"
    """Address to listen on; 0.0.0.0 exposes the box to the whole LAN (then every surface but funvoice needs a token)."""
    port: int = Field(8000, ge=1, le=65535)
    """TCP port for HTTP and WebSocket endpoints."""
    token: SecretStr | None = None
    """Bearer token (header or ?token=) for every surface without one of its own in tokens/token_files; none leaves those open. Prefer token_file or the environment."""
    token_file: Path | None = None
    """File holding the bearer token (used when token is not set)."""
    tokens: dict[Surface, SecretStr] = Field(default_factory=dict)
    """Per-surface bearer tokens (multicam, seats, dashboard, metrics, funvoice); a surface named here ignores token."""
    token_files: dict[Surface, Path] = Field(default_factory=dict)
    """Files holding per-surface tokens (for surfaces not in tokens)."""
    allow_insecure_lan: bool = False
    """Listen beyond loopback with multicam, seats, dashboard or metrics open (no token); warns at every start. Off: refused."""
    allowed_hosts: list[str] = Field(default_factory=list)
    """Host header names accepted besides IP addresses, localhost, this machine's hostname and funvoice.public_url's (a DNS-rebinding guard); ["*"] accepts any."""
    tls_cert: Path | None = None
    """PEM certificate chain; with tls_key, serves https/wss."""
    tls_key: Path | None = None
    """PEM private key for tls_cert."""
    cors_origins: list[str] = Field(default_factory=list)
    """Browser origins (scheme://host:port) allowed to call the API and open WebSockets; same-origin is always allowed. "*" allows any origin to read (GET), never to open a WebSocket or change state."""
    max_connections: int = Field(256, ge=1)
    """Open WebSocket connections accepted at once; more are refused with 503."""
    max_connections_per_peer: int = Field(64, ge=1)
    """Open WebSocket connections one peer address may hold (so one laptop cannot take every slot); more get 503."""
    max_streams_per_connection: int = Field(16, ge=1, le=256)
    """Audio streams one /asr-multicam connection may hold open."""
    max_streams: int = Field(64, ge=1)
    """Audio streams open at once across the whole daemon (microphones included)."""
    max_frame_bytes: int = Field(1 << 20, ge=1024)
    """Largest WebSocket frame accepted; a larger one (up to 4x) is answered with frame_too_large, beyond that the connection is closed (1009)."""
    max_frames_per_s: int = Field(2000, ge=10)
    """Frames per second one /asr-multicam connection may send (bursts of one second's worth); beyond it reading slows down and the client is told rate_limited."""
    max_stream_starts_per_min: int = Field(120, ge=1)
    """audio_stream_start messages per minute from one peer address, all its connections together (bursts of a minute's worth); more are refused with start_rate_limited."""
    idle_timeout_s: float = Field(300.0, ge=1)
    """An /asr-multicam client that sends nothing for this long is told idle_timeout and closed (1008); a ping keeps it open."""
    shutdown_timeout_s: float | None = Field(None, gt=0)
    """Deprecated and ignored (logged at start): the [shutdown] section budgets each shutdown phase."""

    def bearer_token(self) -> str | None:
        """The configured token, read from token or token_file."""
        return _read_secret(self.token, self.token_file, "server.token_file")

    def surface_token(self, surface: Surface) -> str | None:
        """The token guarding ``surface``: its own (tokens, token_files), else the shared one, else None (open)."""
        own = _read_secret(self.tokens.get(surface), self.token_files.get(surface), f"server.token_files.{surface}")
        return own if own is not None else self.bearer_token()

    def open_lan_surfaces(self) -> list[Surface]:
        """The LAN_GUARDED surfaces without any token configured (the files are not read)."""

        def configured(value: SecretStr | None, path: Path | None) -> bool:
            return bool(value is not None and value.get_secret_value()) or path is not None

        shared = configured(self.token, self.token_file)
        return [s for s in LAN_GUARDED if not (shared or configured(self.tokens.get(s), self.token_files.get(s)))]

    @field_validator("tls_key")
    @classmethod
    def _pair(cls, v: Path | None, info: Any) -> Path | None:
        if (v is None) != (info.data.get("tls_cert") is None):
            raise ValueError("tls_cert and tls_key must be set together")
        return v

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        for origin in v:
            if origin != "*" and not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/?#\s]+/?", origin):
                raise ValueError(
                    f"{origin!r} is not an origin such as https://frontend.example or http://10.0.0.5:3000"
                )
        return [o.rstrip("/") for o in v]

    @model_validator(mode="after")
    def _lan_needs_tokens(self) -> ServerSettings:
        open_surfaces = self.open_lan_surfaces()
        if open_surfaces and not self.allow_insecure_lan and not is_loopback_host(self.host):
            raise ValueError(
                f"host {self.host!r} listens beyond this machine but {', '.join(open_surfaces)} would be open to "
                "anyone on the LAN: set server.token_file (or server.token, or per surface server.tokens / "
                "server.token_files), or accept the risk with server.allow_insecure_lan = true"
            )
        return self


class StateSettings(_Section):
    """Where runtime state lives."""

    dir: Path | None = None
    """Spool and runtime state; default $STATE_DIRECTORY (systemd) or the user's state directory."""
    min_free_mb: int = Field(200, ge=0)
    """Free space the state directory must keep; doctor warns and the spool refuses to grow below it."""

    def path(self) -> Path:
        """The resolved state directory (not created)."""
        if self.dir is not None:
            return self.dir
        systemd_dirs = os.environ.get("STATE_DIRECTORY")
        if systemd_dirs:
            return Path(systemd_dirs.split(":")[0])
        from platformdirs import user_state_dir

        return Path(user_state_dir("edgevoice", appauthor=False))


class AsrSettings(_Section):
    """Speech recognition with faster-whisper (CTranslate2)."""

    model: str = "tiny.en"
    """A model name from the manifest in models/ (see `edgevoice models list`) or a CTranslate2 model directory."""
    models_dir: Path | None = None
    """Where `edgevoice models install` puts models; default <state.dir>/models."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Inference device; auto uses CUDA when CTranslate2 sees a GPU."""
    device_index: int = Field(0, ge=0)
    """CUDA device number."""
    compute_type: Literal["auto", "int8", "int8_float16", "int8_float32", "int8_bfloat16", "float16", "float32"] = (
        "auto"
    )
    """Quantization; auto is int8 on CPU and int8_float16 on CUDA."""
    language: str | None = None
    """Default language code (e.g. "vi"); none uses the model's own (English for .en models). Streams may override it."""
    detect_language: bool = False
    """Detect the language per utterance when neither stream nor config names one. Off: unreliable on short clips."""
    cpu_threads: int = Field(0, ge=0)
    """CTranslate2 intra-op threads; 0 uses all cores."""
    multilingual_model: str | None = "base"
    """Model for streams in a language asr.model does not speak (it is English-only); none refuses them with bad_language."""
    beam_size: int = Field(5, ge=1, le=10)
    """Beam width of finals and of the hypotheses long speech is committed from (offline Whisper uses 5); display partials are greedy."""
    max_batch: int = Field(16, ge=1, le=128)
    """Most requests decoded in one batched call."""
    partial_interval_s: float = Field(0.5, ge=0.1, le=10)
    """How often a speaking stream's partial hypothesis is refreshed (skipped first under load)."""
    vad_threshold: float = Field(0.5, gt=0, lt=1)
    """Silero VAD speech probability threshold."""
    min_silence_ms: int = Field(500, ge=100, le=5000)
    """Silence that ends an utterance and makes its text final."""
    max_utterance_s: float = Field(25.0, ge=4, le=28)
    """Longest audio decoded as one piece; longer speech is committed piece by piece before it (see docs/recognition.md)."""
    initial_prompt: str | None = None
    """Text prompt for the decoder. Off by default: prompting with keywords was measured to invent them."""
    window: Literal["shared", "full"] = "shared"
    """Encoder window of asr.model: shared encodes the audio (+1 s) and fills the window with a precomputed encoder output of silence (measured as accurate as offline on tiny.en, several times cheaper; suspect decodes are verified in full); full encodes all 30 s every time."""
    multilingual_window: Literal["shared", "full"] = "full"
    """Encoder window of asr.multilingual_model: full by default (on Vietnamese real speech base was measured 1.1-1.3x offline's WER in the shared window, 0.96-1.1x in the full one, at 3x the cost per decode)."""
    max_backlog_s: float = Field(60.0, ge=5, le=600)
    """Audio one stream may have waiting for recognition; beyond it the oldest is dropped, counted and logged."""

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, data: Any) -> Any:
        """Keys of earlier versions keep working: the fitted window is gone (it cost accuracy)."""
        if isinstance(data, dict):
            data = dict(data)
            if data.pop("final_budget_s", None) is not None:
                log.warning("asr.final_budget_s is no longer used (finals are never decoded in a shrunk window)")
            if data.get("window") in ("auto", "fit"):
                log.warning('asr.window = "%s" is no longer offered; using "shared"', data["window"])
                data["window"] = "shared"
        return data

    @field_validator("multilingual_model")
    @classmethod
    def _none(cls, v: str | None) -> str | None:
        return None if v is None or v.strip().lower() in ("", "none") else v

    @field_validator("language")
    @classmethod
    def _lang(cls, v: str | None) -> str | None:
        if v is not None and not (2 <= len(v) <= 8 and v.replace("-", "").isalpha()):
            raise ValueError("must be a language code such as 'en' or 'vi'")
        return v


class KeywordRule(_Section):
    """One experience event and the phrases that fire it."""

    event: str = Field(pattern=r"^[A-Z][A-Z0-9_]{0,63}$")
    """Event name sent as EVENT, e.g. SAY_HELLO."""
    phrases: list[str] = Field(min_length=1)
    """Phrases that fire the event (any language)."""
    languages: list[str] = Field(default_factory=list)
    """Languages this rule applies to; empty means every language."""


def _default_rules() -> list[KeywordRule]:
    return [
        KeywordRule(event="SAY_HELLO", phrases=["xin chào", "hello"]),
        KeywordRule(event="SAY_SORRY", phrases=["xin lỗi", "sorry"]),
    ]


class KeywordSettings(_Section):
    """Keyword rules turning final (and stable partial) text into customer events."""

    rules: list[KeywordRule] = Field(default_factory=_default_rules)
    """Event rules; reloaded on SIGHUP without dropping streams."""
    ignore_diacritics: bool = True
    """Match "xin chao" to "xin chào"."""
    max_edits: int = Field(1, ge=0, le=3)
    """Character edits tolerated per phrase of 6+ letters (recognition errors)."""
    match_partials: bool = False
    """Also fire on stable partial text for lower latency."""
    session_end_event: str = Field("SESSION_END", pattern=r"^[A-Z][A-Z0-9_]{0,63}$")
    """Event sent when the customer's last stream stops."""


RETRY_4XX_DEFAULT = (401, 403, 404, 407, 408, 409, 421, 425, 429, 499)
"""4xx answers retried by default: auth, routing and proxy answers that change when the API is back, not the event."""


class EventsSettings(_Section):
    """Durable delivery of experience events (disk spool + HTTP sender)."""

    url: str | None = None
    """Experience-event API URL; none keeps events waiting on disk."""
    timeout_s: float = Field(10.0, gt=0, le=300)
    """Per-request timeout."""
    retry_base_s: float = Field(0.5, gt=0)
    """First retry delay (full-jitter exponential backoff)."""
    retry_cap_s: float = Field(60.0, gt=0)
    """Longest retry delay."""
    concurrency: int = Field(8, ge=1, le=256)
    """Requests in flight at once (one per customer)."""
    max_events: int = Field(100_000, ge=10)
    """Most events waiting in the spool (dead letters not counted; they count against max_bytes)."""
    max_bytes: int = Field(64 << 20, ge=1 << 16)
    """Most bytes of events and dead letters kept in the spool (counted per row with index overhead)."""
    full_policy: Literal["refuse_new", "drop_oldest"] = "refuse_new"
    """When full: refuse_new fails submit; drop_oldest drops the oldest dead letters, then the oldest waiting events. Counted and logged."""
    max_age_s: float = Field(7 * 86400, gt=0)
    """Longest an event waits before it moves to the dead-letter table, counted while the daemon runs on a monotonic clock kept across restarts (never the wall clock: an NTP step expires nothing)."""
    commit_window_ms: float = Field(2.0, ge=0, le=100)
    """Group-commit window: events arriving within it share one fsync."""
    retry_4xx: list[int] = Field(default_factory=lambda: list(RETRY_4XX_DEFAULT))
    """4xx answers retried with backoff like 5xx and timeouts (what proxies and gateways answer while the API is deployed or its route is missing); any other 4xx (400, 413, 415, 422, ...) moves the event to the dead-letter table. Redirects (3xx) are never followed and always retried."""
    lock_timeout_s: float = Field(10.0, gt=0, le=600)
    """How long a spool write waits for a lock held by another process before the spool counts as unavailable: new events are then held in memory and retried, and /health says degraded."""
    memory_max_events: int = Field(10_000, ge=10, le=1_000_000)
    """Events held in memory while the spool cannot be written (locked, disk full, I/O error, free disk below state.min_free_mb); beyond it submit raises SpoolFull."""

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        from urllib.parse import urlsplit

        if v is not None and (urlsplit(v).scheme not in ("http", "https") or not urlsplit(v).hostname):
            raise ValueError(
                "must be an http:// or https:// URL with a host, e.g. http://experience-api.lan:4000/api/v1/experience-event"
            )
        return v

    @field_validator("retry_4xx")
    @classmethod
    def _client_errors(cls, v: list[int]) -> list[int]:
        bad = [c for c in v if not 400 <= c <= 499]
        if bad:
            raise ValueError(f"must list 4xx status codes (400-499), got {bad}")
        return sorted(set(v))


class SessionSettings(_Section):
    """Customer sessions on streams: what is kept of their words, and how a mic seat hands over."""

    max_transcript_chars: int = Field(20_000, ge=200, le=1_000_000)
    """Final text kept per customer session and per stream; the oldest is dropped first (shown as a leading "…"). Bounds memory on long-lived mic seats, the FULL TRANSCRIPT log line and full_transcript."""
    resume_s: float = Field(120.0, ge=0, le=86400)
    """After a crash, a customer session that was open is resumed when a stream opens with its ids within this time of the restart (keywords already fired are not fired again); if none does, its SESSION_END is sent then."""
    unbind_flush_s: float = Field(30.0, gt=0, le=600)
    """After a mic seat is unbound: how long recognition may take to reach the unbind point (the customer's last words) before SESSION_END fires anyway."""


class ShutdownSettings(_Section):
    """The shutdown phases on SIGTERM, in data-flow order, each with its own budget in seconds.

    A phase that overruns its budget is logged, the next phase still runs, and the process
    exits with status 1. Keep total_s() below the unit's TimeoutStopSec (35 s; docs/deploy.md)."""

    stop_accepting_s: float = Field(1.0, gt=0, le=60)
    """Close the listening sockets; refuse new WebSocket upgrades, streams and seat bindings."""
    flush_s: float = Field(10.0, gt=0, le=300)
    """Every open recognition stream recognizes what it received: its last finals and keywords."""
    end_sessions_s: float = Field(2.0, gt=0, le=60)
    """Every stream ends: SESSION_END for every open customer."""
    drain_s: float = Field(5.0, gt=0, le=300)
    """Every fired event committed to the spool (failed submits retried), then the sender stops and the spool closes."""
    deliver_s: float = Field(2.0, ge=0, le=300)
    """Part of drain_s: how long the sender may go on delivering this run's waiting events before it stops (best effort: what is left is sent after the next start)."""
    close_s: float = Field(3.0, gt=0, le=60)
    """WebSocket close handshakes; a client that does not answer in time (or stopped reading) is cut off."""
    stop_s: float = Field(6.0, gt=0, le=300)
    """Stop every component: in-flight HTTP requests, audio devices, the recognition thread."""

    @model_validator(mode="after")
    def _deliver_within_drain(self) -> ShutdownSettings:
        if self.deliver_s >= self.drain_s:
            raise ValueError(
                f"deliver_s ({self.deliver_s}) must be less than drain_s ({self.drain_s}): it is part of it"
            )
        return self

    def budgets(self) -> dict[str, float]:
        """Each phase's budget, in the order the phases run."""
        return {
            "stop_accepting": self.stop_accepting_s,
            "flush": self.flush_s,
            "end_sessions": self.end_sessions_s,
            "drain": self.drain_s,
            "close": self.close_s,
            "stop": self.stop_s,
        }

    def total_s(self) -> float:
        """The longest a clean shutdown may take: the sum of the phase budgets."""
        return sum(self.budgets().values())


class DiarizationSettings(_Section):
    """Who spoke: speaker labels on transcripts."""

    backend: Literal["none", "auto", "sortformer", "embedding"] = "none"
    """none: everyone is "Speaker 1"; sortformer: NeMo on GPU; embedding: light CPU voice embeddings; auto: best the box sustains."""
    model: str = "diar_streaming_sortformer_4spk-v2"
    """Sortformer model name from models/ or a path to a .nemo file."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Torch device for the sortformer and embedding backends; auto uses CUDA when torch sees a GPU."""
    preset: Literal["low_latency", "balanced", "high_accuracy"] = "low_latency"
    """Sortformer streaming sizes: low_latency (1.04 s), balanced (2 s), high_accuracy (10 s); the *_frames keys override one size."""
    chunk_frames: int | None = Field(None, ge=1, le=1000)
    """Sortformer: new 80 ms frames per streaming step; none takes the preset's."""
    left_context_frames: int | None = Field(None, ge=0, le=100)
    """Sortformer: frames of past context given to each step; none takes the preset's."""
    right_context_frames: int | None = Field(None, ge=0, le=100)
    """Sortformer: frames of look-ahead per step (adds latency); none takes the preset's."""
    fifo_frames: int | None = Field(None, ge=0, le=1000)
    """Sortformer: recent frames kept in the FIFO before they move to the speaker cache; none takes the preset's."""
    cache_frames: int | None = Field(None, ge=16, le=1000)
    """Sortformer: frames in the speaker cache (at least 4 per speaker + silence); none takes the preset's."""
    cache_update_frames: int | None = Field(None, ge=1, le=2000)
    """Sortformer: frames moved from the FIFO to the speaker cache per update; none takes the preset's."""
    max_speakers: int = Field(4, ge=1, le=4)
    """Most speakers per stream."""
    similarity_threshold: float = Field(0.7, gt=0, lt=1)
    """embedding backend: cosine similarity above which a voice joins a known speaker."""
    cpu_threads: int = Field(1, ge=0, le=64)
    """Torch intra-op threads when diarizing on the CPU (leaves the cores to recognition); 0 keeps torch's default."""
    max_lag_s: float = Field(30.0, ge=2, le=600)
    """Audio one stream may have waiting for diarization; beyond it the oldest is skipped (its words keep the speaker known)."""

    def streaming(self) -> dict[str, int]:
        """The Sortformer streaming sizes in 80 ms frames: the preset with the overrides applied."""
        sizes = dict(SORTFORMER_PRESETS[self.preset])
        for key, field in _SORTFORMER_OVERRIDES.items():
            value = getattr(self, field)
            if value is not None:
                sizes[key] = value
        return sizes

    @model_validator(mode="after")
    def _check_streaming(self) -> DiarizationSettings:
        s = self.streaming()
        if not s["chunk_len"] <= s["spkcache_update_period"] <= s["fifo_len"] + s["chunk_len"]:
            raise ValueError(
                f"cache_update_frames ({s['spkcache_update_period']}) must be between chunk_frames ({s['chunk_len']}) "
                f"and fifo_frames + chunk_frames ({s['fifo_len'] + s['chunk_len']})"
            )
        return self


_SORTFORMER_OVERRIDES = {
    "chunk_len": "chunk_frames",
    "chunk_left_context": "left_context_frames",
    "chunk_right_context": "right_context_frames",
    "fifo_len": "fifo_frames",
    "spkcache_len": "cache_frames",
    "spkcache_update_period": "cache_update_frames",
}
"""Sortformer streaming parameter -> the diarization key overriding it."""

# NVIDIA's published streaming settings for diar_streaming_sortformer_4spk-v2, in 80 ms frames, in the
# order above; latency = (chunk_len + chunk_right_context) * 80 ms.
SORTFORMER_PRESETS: dict[str, dict[str, int]] = {
    name: dict(zip(_SORTFORMER_OVERRIDES, sizes, strict=True))
    for name, sizes in {
        "low_latency": (6, 1, 7, 188, 188, 144),
        "balanced": (15, 1, 10, 188, 188, 144),
        "high_accuracy": (124, 1, 1, 124, 188, 124),
    }.items()
}
"""Sortformer streaming sizes per ``diarization.preset``."""


class MicSeat(_Section):
    """One seat (or beamformed group) of a microphone array."""

    stream_id: str = Field(pattern=IDENTIFIER_PATTERN)
    """Stream id of this seat, e.g. mic_table_05_seat_01."""
    channels: list[int] = Field(min_length=1)
    """Device channels (0-based) averaged into this seat."""
    language: str | None = None
    """Language for this seat; default asr.language."""

    @field_validator("channels")
    @classmethod
    def _seat_channels(cls, v: list[int]) -> list[int]:
        if any(c < 0 for c in v) or len(set(v)) != len(v):
            raise ValueError("must be distinct channel numbers from 0")
        return v


class MicDevice(_Section):
    """A local capture device matched by name."""

    match: str
    """Regular expression matched against PortAudio device names (stable across boots, unlike indexes)."""
    samplerate: int | None = Field(None, ge=8000, le=192000)
    """Capture rate; default the device's native rate (resampled to 16 kHz)."""
    channels: int | None = Field(None, ge=1, le=64)
    """Channels to open; default the highest seat channel + 1."""
    seats: list[MicSeat] = Field(min_length=1)
    """Seats mapped to stream ids."""

    @field_validator("match")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return v

    @model_validator(mode="after")
    def _fits(self) -> MicDevice:
        highest = max(c for seat in self.seats for c in seat.channels)
        if self.channels is not None and highest >= self.channels:
            raise ValueError(f"a seat uses channel {highest} but only {self.channels} channels are opened")
        return self


class MicSettings(_Section):
    """Local microphone arrays captured with sounddevice."""

    devices: list[MicDevice] = Field(default_factory=list)
    """Arrays to capture; empty disables local capture."""
    reopen_max_s: float = Field(30.0, gt=0)
    """Longest wait between attempts to reopen a lost device."""
    buffer_s: float = Field(5.0, gt=0, le=60)
    """Ring buffer per device; audio beyond it is dropped and counted."""
    stall_s: float = Field(3.0, ge=0.2, le=300)
    """A device that delivers no audio for this long is closed and reopened."""

    @model_validator(mode="after")
    def _unique(self) -> MicSettings:
        seen: set[str] = set()
        for device in self.devices:
            for seat in device.seats:
                if seat.stream_id in seen:
                    raise ValueError(f"stream_id {seat.stream_id!r} is used by more than one seat")
                seen.add(seat.stream_id)
        return self


class FunVoiceSettings(_Section):
    """The FunVoiceChat bridge to Gemini Live."""

    enabled: bool = True
    """Serve /ws, /ws/tools, /ws/product_info, /connect and the product-info endpoints."""
    api_key: SecretStr | None = None
    """Gemini API key; prefer api_key_file or GEMINI_API_KEY/GOOGLE_API_KEY in the environment."""
    api_key_file: Path | None = None
    """File holding the Gemini API key."""
    model: str = "gemini-2.5-flash-native-audio-preview-09-2025"
    """Live model name."""
    voice: str | None = None
    """Prebuilt voice name (e.g. Puck); none uses the model's default."""
    language: str | None = None
    """BCP-47 language for speech (e.g. vi-VN)."""
    system_prompt: str = "You are a friendly restaurant assistant. Answer briefly."
    """System instruction for every conversation."""
    api_version: str | None = None
    """Live API version (e.g. v1beta); none uses GOOGLE_GENAI_API_VERSION, else v1beta (the Live API's)."""
    base_url: str | None = None
    """Gemini API base URL; none uses GOOGLE_GEMINI_BASE_URL or the SDK's default."""
    ca_file: Path | None = None
    """PEM CA bundle trusted for the Gemini endpoint (e.g. a TLS-inspecting proxy); none uses SSL_CERT_FILE or certifi."""
    catalogue: Path | None = None
    """JSON product catalogue the lookup tool answers from: a list of products (or {"products": [...]}), each with "id" and "name"."""
    pages: list[str] = Field(default_factory=list)
    """Front-end pages the model may navigate to (e.g. menu, cart); empty allows any page name."""
    public_url: str | None = None
    """Base URL /connect hands out (e.g. wss://box.example:8000); default from the request."""
    max_sessions: int = Field(32, ge=1, le=1024)
    """Conversations (/ws) open at once; more are refused with too_many_sessions."""
    connect_timeout_s: float = Field(10.0, gt=0, le=120)
    """Time allowed to open a Live session before the client is told Gemini is unreachable."""
    reconnect_attempts: int = Field(5, ge=0, le=100)
    """Reconnections tried (with backoff) when a Live connection drops mid-conversation before giving up."""
    health_interval_s: float = Field(300.0, ge=10)
    """How often /health's llm_service.available is re-probed with a short Live session when no conversation has checked it."""

    @field_validator("base_url", "public_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://", "ws://", "wss://")):
            raise ValueError("must be an absolute URL such as https://host:port")
        return v

    def gemini_api_key(self) -> str | None:
        """The configured key, else the SDK's environment variables."""
        key = _read_secret(self.api_key, self.api_key_file, "funvoice.api_key_file")
        return key or os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY")


class DashboardSettings(_Section):
    """The live dashboard page and Prometheus metrics."""

    enabled: bool = True
    """Serve the dashboard at / and its live feed."""
    metrics: bool = True
    """Serve Prometheus metrics at /metrics."""
    snapshot_interval_s: float = Field(1.0, ge=0.1, le=60)
    """How often the live feed sends a status snapshot (spool, per-stream lag and level, devices, model, Gemini)."""
    history: int = Field(300, ge=0, le=10000)
    """Recent feed messages (stream starts and stops, final text, keyword events, deliveries) replayed to a page that connects."""
    history_bytes: int = Field(1 << 20, ge=0, le=64 << 20)
    """Most bytes (of JSON) of those recent messages; the oldest go first when either bound is reached."""
    max_queue_bytes: int = Field(4 << 20, ge=64 << 10, le=256 << 20)
    """Bytes of feed messages waiting for one page that reads slowly; beyond it the page gets a fresh hello instead."""


class LoggingSettings(_Section):
    """Logging to journald or stderr."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level."""
    transcripts: bool = True
    """Log every final transcript line (TRANSCRIPT [...] Speaker N: ...)."""


_FILE_DATA: ContextVar[dict[str, Any]] = ContextVar("edgevoice_file_data")


class _FileSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return _FILE_DATA.get({}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_FILE_DATA.get({}))


class Settings(BaseSettings):
    """The whole effective configuration of one daemon."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
        use_attribute_docstrings=True,
        nested_model_default_partial_update=True,
    )

    server: ServerSettings = ServerSettings()
    state: StateSettings = StateSettings()
    asr: AsrSettings = AsrSettings()
    keywords: KeywordSettings = KeywordSettings()
    events: EventsSettings = EventsSettings()
    sessions: SessionSettings = SessionSettings()
    diarization: DiarizationSettings = DiarizationSettings()
    mic: MicSettings = MicSettings()
    funvoice: FunVoiceSettings = FunVoiceSettings()
    dashboard: DashboardSettings = DashboardSettings()
    logging: LoggingSettings = LoggingSettings()
    shutdown: ShutdownSettings = ShutdownSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _FileSource(settings_cls)


def resolve_config_path(path: str | Path | None, env: Mapping[str, str] | None = None) -> Path | None:
    """The file to read: explicit, $EDGEVOICE_CONFIG, the system file, or none."""
    variables = os.environ if env is None else env
    if path:
        return Path(path)
    if variables.get("EDGEVOICE_CONFIG"):
        return Path(variables["EDGEVOICE_CONFIG"])
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _lookup(data: Any, loc: tuple[Any, ...]) -> tuple[bool, Any]:
    for part in loc:
        if (isinstance(data, dict) and part in data) or (
            isinstance(data, list) and isinstance(part, int) and part < len(data)
        ):
            data = data[part]
        else:
            return False, None
    return True, data


def _format_errors(exc: ValidationError, path: Path | None, file_data: dict[str, Any]) -> str:
    origin = str(path) if path else "embedded defaults"
    lines = [f"invalid configuration ({origin}):"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        env_name = ENV_PREFIX + "__".join(str(p).upper() for p in loc)
        found, value = _lookup(file_data, loc)
        if env_name in os.environ:
            source = f" (from ${env_name})"
            value, found = os.environ[env_name], True
        else:
            source = f" (in {path})" if path and found else ""
        if "token" in key or "api_key" in key:
            value = "***"
        shown = f" = {value!r}" if found and not isinstance(value, (dict, list)) else ""  # a section may hold secrets
        msg = err["msg"]
        if err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parent = loc[:-1]
            allowed = _allowed_keys(parent)
            msg = f"unknown key; allowed here: {', '.join(allowed)}" if allowed else "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  {key}{shown}{source}: {msg}")
    return "\n".join(lines)


def _allowed_keys(parent: tuple[Any, ...]) -> list[str]:
    model: Any = Settings
    for part in parent:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        model = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return sorted(getattr(model, "model_fields", {}))


def load_settings(path: str | Path | None = None) -> Settings:
    """Read, merge and validate the configuration; raise :class:`ConfigError` on any problem."""
    resolved = resolve_config_path(path)
    data = _read_toml(resolved) if resolved else {}
    token = _FILE_DATA.set(data)
    try:
        settings = Settings()
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, resolved, data)) from None
    finally:
        _FILE_DATA.reset(token)
    # Secrets in files must be readable now, not at the first request.
    for surface in SURFACES:
        settings.server.surface_token(surface)
    settings.funvoice.gemini_api_key()
    for key, p in (("server.tls_cert", settings.server.tls_cert), ("server.tls_key", settings.server.tls_key)):
        if p is not None and not p.is_file():
            raise ConfigError(f"{key} = {str(p)!r}: no such file")
    if settings.server.tls_cert is not None and settings.server.tls_key is not None:
        import ssl

        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                settings.server.tls_cert, settings.server.tls_key
            )
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"server.tls_cert = {str(settings.server.tls_cert)!r}, server.tls_key = {str(settings.server.tls_key)!r}:"
                f" not a PEM certificate chain and its private key ({exc})"
            ) from None
    return settings


def masked_dump(settings: Settings) -> dict[str, Any]:
    """The effective configuration as plain data with every secret masked."""
    return settings.model_dump(mode="json")  # SecretStr dumps as '**********'
