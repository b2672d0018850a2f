"""Who may run C-FIND, C-GET and C-MOVE: the one decision, for every Q/R handler.

``allowed(cfg.qr, op, calling_ae, is_node)``, with ``op`` one of ``find``,
``get``, ``move`` and ``is_node(ae_title)`` true when a dicom node of the
registry (store/nodes.py, any source) has that AE title:

1. a ``[node:NAME] allow_<op> = true|false`` of the dicom node whose AE
   title is the calling AE title decides first;
2. else the ``[qr] allow_<op>`` rule: ``any``, ``none``, or a list of
   calling AE titles and/or ``nodes`` (any dicom node's AE title).

Defaults (DESIGN.md §5): any calling AE may find and get; a move may be
asked for by a known node only, and its destination must be a known node
(the C-MOVE handler's check, whatever this says).

A refused operation is answered ``REFUSED`` (0x0124 "Refused: Not
authorized", PS3.7 C.5.x general status) with no sub-operation and nothing
read from the catalog; the association itself stays up.  The calling AE
title is what the peer claims: this is policy against mistakes and casual
use, not authentication (docs/security.md).
"""

from __future__ import annotations

from collections.abc import Callable

from ith_proxy.config import QrConfig

REFUSED = 0x0124
OPERATIONS = ("find", "get", "move")


def allowed(qr: QrConfig, op: str, calling_ae: str, is_node: Callable[[str], bool]) -> bool:
    """Whether ``calling_ae`` may run ``op``; ``is_node`` is only called when
    the rule names ``nodes``."""
    if op not in OPERATIONS:
        raise ValueError(f"unknown Q/R operation {op!r}")
    ae = str(calling_ae).strip()
    for node_ae, node_op, verdict in qr.node_access:
        if node_ae == ae and node_op == op:
            return verdict
    rule: tuple[str, ...] = getattr(qr, f"allow_{op}")
    if rule == ("any",):
        return True
    if rule == ("none",) or not ae:
        return False
    if ae in rule:
        return True
    return "nodes" in rule and bool(is_node(ae))
