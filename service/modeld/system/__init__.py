"""Thin adapters to the operating system: D-Bus, systemd, cgroups, journald, sd_notify, inotify."""
