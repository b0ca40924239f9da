"""Sandbox mode: fake providers inside the gateway, so the whole flow runs with no credentials."""

from __future__ import annotations

import dataclasses
import logging

from gateway.config import Settings

log = logging.getLogger("gateway.sandbox")


def apply_sandbox(settings: Settings) -> Settings:
    """Settings for sandbox mode: the demo page on, loud in the log."""
    log.warning("SANDBOX MODE: fake providers are mounted; never use this in production")
    server = dataclasses.replace(settings.server, demo=True)
    return dataclasses.replace(settings, server=server, sandbox=True)
