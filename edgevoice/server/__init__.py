"""The HTTP/WebSocket server: app factory, LAN hardening, health."""
