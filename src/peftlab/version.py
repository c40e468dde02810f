"""The package version, in a leaf module so that methods and artifacts need not import the package facade."""

__version__ = "0.1.0"
