"""The package version, in a module of its own so that no lower module imports the whole package."""

__version__ = "0.1.0"
