"""Is an instance a PHI risk that de-identifying its header cannot remove?

Pure functions on the header dataset and on the findings of the pixel data
scan (ith_proxy/dicom/codestream.py).  The indexer quarantines a risky instance to
``quarantine/phi-risk/`` instead of de-identifying it; the reasons are fixed
phrases naming attributes or segment kinds, never values.

- Burned-in risk, declared by the header (checked with
  ``[deid] quarantine_burned_in``, the default): Burned In Annotation YES,
  Recognizable Visual Features YES (a face or other identifying features
  that a viewer could recognise), or a Secondary Capture instance (often a
  screenshot with text).  An absent Burned In Annotation is not a risk by
  itself: see docs/deid.md for what it means per accepted SOP class.
- Text in the codestream (checked whenever de-identifying): a JPEG COM or
  APPn segment, a JPEG 2000 COM segment, or encapsulated pixel data that
  could not be checked.  Such segments are never copied; they are not
  stripped either, because removing bytes changes the fragment lengths and
  offset tables and, for APP14 Adobe, the colour decoding.
"""

from __future__ import annotations

from collections.abc import Sequence

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its .1 to .4 variants


def _yes(ds, tag: int, keyword: str) -> bool:
    # ``tag in ds`` first: a keyword lookup of an absent attribute costs more
    return tag in ds and str(ds.get(keyword, "") or "").strip().upper() == "YES"


def burned_in_risk(ds) -> str | None:
    """Why the header says the pixels may identify the patient, or None."""
    if _yes(ds, 0x00280301, "BurnedInAnnotation"):
        return "BurnedInAnnotation is YES (identifying text in the pixels)"
    if _yes(ds, 0x00280302, "RecognizableVisualFeatures"):
        return "RecognizableVisualFeatures is YES (identifying features in the pixels)"
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class == SECONDARY_CAPTURE or sop_class.startswith(SECONDARY_CAPTURE + "."):
        return "Secondary Capture instance (may carry burned-in text)"
    return None


def codestream_risk(findings: Sequence[str]) -> str | None:
    """Why the encapsulated pixel data may carry text outside the pixels, or None."""
    if not findings:
        return None
    return f"pixel data codestream may carry identifying text: {findings[0]}"


def phi_risk(ds, findings: Sequence[str], *, burned_in: bool = True) -> str | None:
    """The first reason to quarantine instead of de-identifying, or None.
    ``burned_in`` is ``[deid] quarantine_burned_in``; codestream segments
    are a risk whatever it says (they are not pixels, they would be copied)."""
    return (burned_in_risk(ds) if burned_in else None) or codestream_risk(findings)
