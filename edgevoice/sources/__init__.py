"""Audio sources: local microphone arrays and /asr-multicam WebSocket clients."""
