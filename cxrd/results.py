"""Temp files left by writers that died mid-write."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)
