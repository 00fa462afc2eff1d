"""Prometheus metrics, one registry per daemon (no module-level state).

Components take the :class:`Metrics` from ``app[METRICS]``; code running outside
a daemon (CLI, benches) builds its own ``Metrics()``.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)


class Metrics:
    """Every ``edgevoice_*`` metric of one daemon."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(namespace="edgevoice", registry=r)
        self.streams = Gauge("edgevoice_streams", "Audio streams open", ["source"], registry=r)
        self.audio_seconds = Counter("edgevoice_audio_seconds", "Seconds of audio received", ["source"], registry=r)
        self.recognition_lag = Gauge(
            "edgevoice_recognition_lag_seconds",
            "Audio received but not yet recognized, per stream",
            ["stream_id"],
            registry=r,
        )
        self.batch_size = Histogram(
            "edgevoice_inference_batch_size",
            "Stream windows per batched inference call",
            ["kind"],
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.inference_seconds = Histogram(
            "edgevoice_inference_seconds",
            "Wall time of one batched inference call",
            ["kind"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.partials_skipped = Counter(
            "edgevoice_partials_skipped", "Partial refreshes skipped under load", registry=r
        )
        self.final_latency = Histogram(
            "edgevoice_final_latency_seconds", "End of speech to final text", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.words = Counter("edgevoice_words", "Words in final transcripts", registry=r)
        self.keyword_events = Counter("edgevoice_keyword_events", "Customer events fired", ["event"], registry=r)
        self.event_submit_failures = Counter(
            "edgevoice_event_submit_failures",
            "Hand-offs of fired events to the event queue that failed and are retried",
            ["kind"],
            registry=r,
        )
        self.deliveries = Counter("edgevoice_deliveries", "Delivery attempts by outcome", ["outcome"], registry=r)
        self.spool_events = Counter(
            "edgevoice_spool_events", "Events accepted into / refused or dropped by the spool", ["outcome"], registry=r
        )
        self.spool_depth = Gauge("edgevoice_spool_depth", "Events waiting for delivery", registry=r)
        self.spool_dead = Gauge("edgevoice_spool_dead", "Events in the dead-letter table", registry=r)
        self.spool_oldest_age = Gauge(
            "edgevoice_spool_oldest_age_seconds", "Age of the oldest waiting event", registry=r
        )
        self.gemini_sessions = Gauge("edgevoice_gemini_sessions", "Open Gemini Live sessions", registry=r)
        self.mic_overflows = Counter(
            "edgevoice_mic_overflows",
            "Audio frames dropped because a device ring buffer was full",
            ["device"],
            registry=r,
        )
        self.mic_device_up = Gauge(
            "edgevoice_mic_device_up", "1 while a capture device is open", ["device"], registry=r
        )
        self.diarization_seconds = Counter(
            "edgevoice_diarization_seconds", "Compute seconds spent on diarization", ["backend"], registry=r
        )
        self.recognition_dropped = Counter(
            "edgevoice_recognition_dropped_seconds",
            "Audio dropped unrecognized because a stream's backlog exceeded asr.max_backlog_s",
            registry=r,
        )


METRICS = web.AppKey("metrics", Metrics)
"""The daemon's metrics."""
