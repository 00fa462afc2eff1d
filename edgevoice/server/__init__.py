"""The web kernel: the aiohttp application every feature plugs into, and nothing else.

It owns the app keys every component shares (:mod:`~edgevoice.server.keys`), the
LAN hardening middleware and TLS (:mod:`~edgevoice.server.security`), ``/health``
(:mod:`~edgevoice.server.health`) and the bare application
(:func:`~edgevoice.server.kernel.new_app`). Every feature may import it; it
imports no feature (tests/test_architecture.py enforces that). Which features
run, and in what order, is decided by the composition root, :mod:`edgevoice.app`.
"""
