"""modeld: a systemd service that supervises AI model backends in transient scopes."""

__version__ = "0.1.0"
