"""The HTTP front door served on modeld.socket."""
