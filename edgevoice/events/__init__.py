"""Customer sessions and keyword events."""
