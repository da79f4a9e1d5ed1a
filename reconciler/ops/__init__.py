"""Running it unattended: daemon and schedule, metrics, logs, checks."""
