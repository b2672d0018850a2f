"""ith-proxy: an edge DICOM proxy."""

__version__ = "0.1.0"
