"""modeld's integration-test sandbox: a real systemd + D-Bus system bus in namespaces.

See README.md here, and boot-systemd.sh for the details of the isolation.
"""

from .fixture import (
    NS_BUS_ADDRESS,
    SCRIPT,
    CommandError,
    Sandbox,
    SandboxError,
    booted_sandbox,
    default_name,
    live_sandboxes,
    missing_prerequisites,
    polkit_missing,
)

__all__ = [
    "NS_BUS_ADDRESS",
    "SCRIPT",
    "CommandError",
    "Sandbox",
    "SandboxError",
    "booted_sandbox",
    "default_name",
    "live_sandboxes",
    "missing_prerequisites",
    "polkit_missing",
]
