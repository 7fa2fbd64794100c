"""Thin adapters to the operating system: systemd, cgroups, journald, sd_notify, inotify."""
