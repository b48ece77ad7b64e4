"""cxrd: a chest X-ray AI node for hospital networks."""

__version__ = "0.1.0"
