"""SIGKILL with customers seated, on the real daemon: their sessions are resumed or ended after the restart.

Real subprocess daemons on one state directory, a real /asr-multicam client, real speech, a
real HTTP receiver. The policy (docs/delivery.md, "Customer sessions across a crash"): a session
open at the crash is resumed when a stream opens with its ids within ``sessions.resume_s`` of the
restart (its keywords are not fired again, one SESSION_END at its end); otherwise its SESSION_END
is sent when that time is up.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edgevoice import modelstore
from edgevoice.sources.multicam_client import MulticamClient
from tests.support.daemon import Daemon
from tests.support.receiver import Receiver
from tests.support.speech import have_espeak, silence, synth

pytestmark = pytest.mark.skipif(not have_espeak(), reason="needs espeak-ng")
MODELS = Path(tempfile.gettempdir()) / "edgevoice-test-models"
SESSION = "restaurant_table_05_evening"
HELLO = np.concatenate([silence(0.5), synth("Hello, can I see the menu please?"), silence(1.2)])


def env(receiver: Receiver, **extra: str) -> dict[str, str]:
    return {
        "EDGEVOICE_ASR__MODEL": str(modelstore.resolve("tiny.en", MODELS)),
        "EDGEVOICE_ASR__MULTILINGUAL_MODEL": "",
        "EDGEVOICE_EVENTS__URL": receiver.url,
        "EDGEVOICE_EVENTS__RETRY_BASE_S": "0.1",
        **extra,
    }


async def test_sigkill_with_customers_seated(daemon_factory: Callable[..., Daemon], receiver: Receiver) -> None:
    first = daemon_factory(env=env(receiver))
    async with MulticamClient.connect(first.ws_url) as client:
        for ch, customer in enumerate(("cust_back", "cust_gone")):
            await client.start(f"seat_{ch}", session_id=SESSION, customer_id=customer, channel=ch)
        await client.stream(0, HELLO, realtime=False)
        await client.stream(1, HELLO, realtime=False)
        await receiver.until_accepted(2, timeout=90)  # both SAY_HELLO delivered
        first.kill()  # SIGKILL: no shutdown, no SESSION_END
    assert sorted(receiver.events()) == ["SAY_HELLO", "SAY_HELLO"]

    again = daemon_factory(
        env={
            **env(receiver, EDGEVOICE_SESSIONS__RESUME_S="20"),
            "EDGEVOICE_STATE__DIR": first.env["EDGEVOICE_STATE__DIR"],
        }
    )
    assert "customer session(s) were open when the daemon last stopped" in again.log()
    async with MulticamClient.connect(again.ws_url) as client:
        # The camera of one customer reconnects: the same session goes on; hello is not sent twice.
        await client.start("seat_0", session_id=SESSION, customer_id="cust_back")
        await client.stream(0, HELLO, realtime=False)
        transcript = await client.stop("seat_0")
        assert "hello" in transcript.lower()
        await receiver.until_accepted(3, timeout=60)
    assert receiver.events("cust_back") == ["SAY_HELLO", "SESSION_END"]
    # The other never comes back: its SESSION_END is sent once resume_s is up.
    await receiver.until_accepted(4, timeout=90)
    assert receiver.events("cust_gone") == ["SAY_HELLO", "SESSION_END"]
    again.stop()

    # Nothing is left to resume or end at the next start.
    third = daemon_factory(env={**env(receiver), "EDGEVOICE_STATE__DIR": first.env["EDGEVOICE_STATE__DIR"]})
    assert "were open when the daemon last stopped" not in third.log()
    third.stop()
    assert len(receiver.events()) == 4
