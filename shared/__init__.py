"""The common library of gfaas services: wire schema, subjects, bus helpers, policies."""

__version__ = "0.1.0"
