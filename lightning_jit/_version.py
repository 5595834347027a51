"""The package version, in one place (read by the package root and the audit records)."""

__version__ = "0.2.0"
