"""Retain Safe Private: which private attributes may stay.

A private attribute is identified by its group, its private creator string
and the low byte of its element (``gggg,xxee`` in PS3.15 notation), never by
its raw element number, which depends on the block the creator was given.

The built-in list holds quantitative vendor attributes that carry no
identity and that downstream tools need (PET SUV scaling, MR diffusion
encoding).  Sites add their own in ``[deid] safe_private``.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from ..config import parse_safe_private

BUILT_IN = (
    "7053,xx00 Philips PET Private Group",   # SUV factor
    "7053,xx09 Philips PET Private Group",   # activity concentration scale factor
    "0019,xx0A SIEMENS MR HEADER",           # number of images in mosaic
    "0019,xx0B SIEMENS MR HEADER",           # slice measurement duration
    "0019,xx0C SIEMENS MR HEADER",           # b value
    "0019,xx0D SIEMENS MR HEADER",           # diffusion directionality
    "0019,xx0E SIEMENS MR HEADER",           # diffusion gradient direction
    "0019,xx27 SIEMENS MR HEADER",           # b matrix
)

class SafePrivate:
    def __init__(self, extra: tuple[tuple[int, str, int], ...] = ()) -> None:
        self.safe = set(parse_safe_private(";".join(BUILT_IN))) | set(extra)

    def is_safe(self, ds: Dataset, tag: BaseTag) -> bool:
        block = tag.element >> 8
        if block < 0x10:
            return False
        creator = ds.get((tag.group, block))
        if creator is None or not isinstance(creator.value, str):
            return False
        return (tag.group, creator.value.strip().upper(), tag.element & 0xFF) in self.safe
