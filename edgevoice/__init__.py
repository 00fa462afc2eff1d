"""edgevoice: the voice appliance daemon for restaurant LAN boxes."""

__version__ = "0.1.0"
