"""The org.modeld1 D-Bus API adapter over the supervisor."""
