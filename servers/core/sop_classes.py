"""The image storage SOP classes the archive statement names, under its names.

pydicom's dictionary drops "(Retired)" from the retired classes' names, so the
statement's names for them are kept here, next to the UIDs.
"""

from __future__ import annotations

US_RETIRED = "1.2.840.10008.5.1.4.1.1.6"
US = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME_RETIRED = "1.2.840.10008.5.1.4.1.1.3"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
CR = "1.2.840.10008.5.1.4.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
NM_RETIRED = "1.2.840.10008.5.1.4.1.1.5"
SC = "1.2.840.10008.5.1.4.1.1.7"

RETIRED_NAMES: dict[str, str] = {
    US_RETIRED: "US Image Storage (Retired)",
    US_MULTIFRAME_RETIRED: "US Multi-frame Storage (Retired)",
    NM_RETIRED: "NM Image Storage (Retired)",
}
