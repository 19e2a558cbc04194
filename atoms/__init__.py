"""Atom Theory verification toolkit."""
