"""attnopt's version (one module of its own, so the artifact manifest can record it without importing the package)."""

__version__ = "0.1.0"
