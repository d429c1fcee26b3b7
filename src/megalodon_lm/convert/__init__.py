"""Converters from other checkpoint formats into megalodon-lm run directories."""

from .reference import convert_reference

__all__ = ["convert_reference"]
