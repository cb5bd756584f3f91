"""Typed settings, the persona text and the tone probes."""

from config.settings import Settings, load_settings

__all__ = ["Settings", "load_settings"]
