"""A corpus of generated files for the equivalence tests (test_encode_equal,
test_read_equal): series of three modalities in Explicit VR LE, Implicit VR
LE, Explicit VR BE and RLE, and every instance of the canary study."""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

import canary
import dicomgen


def encodings_and_canary(root: Path) -> list[Path]:
    files: list[Path] = []
    for i, ts in enumerate(
        (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, RLELossless)
    ):
        for modality in ("CT", "MR", "PT"):
            s = dicomgen.make_series(
                root / f"{modality}{i}", 2, modality=modality, rows=16, cols=16, transfer_syntax=ts
            )
            files += [Path(p) for p in s.files]
    files += [i.path for i in canary.build_canary(root / "canary", rows=16, cols=16).instances]
    return files
