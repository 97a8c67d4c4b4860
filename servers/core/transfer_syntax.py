"""Transfer syntax UIDs the statements name, under their statement names."""

from __future__ import annotations

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"

VERIFICATION = "1.2.840.10008.1.1"
