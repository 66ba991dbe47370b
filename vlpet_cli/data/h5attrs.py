"""What the image and the video feature stores share: the dtypes they write and HDF5 attributes as plain values."""

from __future__ import annotations

from typing import Any

DTYPES = ("float16", "float32")


def plain(value: Any) -> Any:
    """HDF5 attribute value -> JSON-friendly python value."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value


def read_attrs(attrs: Any) -> dict:
    """HDF5 attribute manager -> plain dict."""
    return {key: plain(attrs[key]) for key in attrs}
