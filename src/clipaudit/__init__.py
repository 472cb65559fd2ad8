"""clipaudit: find where image-text embedding models are blind (DAF and TCAC, at corpus scale)."""

__version__ = "0.1.0"
