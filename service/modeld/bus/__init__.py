"""The D-Bus adapter. Everything that imports dbus-next lives in this package."""
