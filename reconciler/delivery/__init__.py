"""Sending planned updates to the webhook: pacing, retries, redirects."""
