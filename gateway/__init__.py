"""Phone-verification gateway: Truecaller and Veriph.One sessions pushed over Server-Sent Events."""

from __future__ import annotations

__version__ = "0.1.0"
