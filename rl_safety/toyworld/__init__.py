"""The embedded toy world: procedural data, its shipped models, and the commands that build them."""

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
