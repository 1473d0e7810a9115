"""dockd: verified offload of body-worn camera footage into an evidence store."""

__version__ = "0.1.0"
