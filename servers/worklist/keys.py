"""The Modality Worklist Information Model as this SCP supports it (PS3.4 Table K.6-1).

Three kinds of key, by keyword:

- the eight required matching keys (Matching Key Type R), matched as the digest's
  §3.3 says; every other key is a return key only (the sample matches on no
  optional key, §C.4.2.1.4.1.3);
- supported return keys: K.6-1's required return keys, the sample's Table C.4.2-7
  and the attributes its HL7 mapping (Table C.8.1-2) supplies (digest B7);
- other attributes of the model's modules: accepted, not returned, answered FF01.

Anything else is outside the model and answered A900 (digest B3).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, tag_for_keyword

# Matched on; inside the Scheduled Procedure Step Sequence unless noted.
SPS_MATCHING = (
    "ScheduledStationAETitle",
    "ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepStartTime",
    "Modality",
    "ScheduledPerformingPhysicianName",
)
TOP_MATCHING = ("PatientName", "PatientID")

SPS_SUPPORTED = (
    *SPS_MATCHING,
    "ScheduledProcedureStepDescription",
    "ScheduledStationName",
    "ScheduledProcedureStepLocation",
    "ScheduledProtocolCodeSequence",
    "PreMedication",
    "ScheduledProcedureStepID",
    "RequestedContrastAgent",
    "ScheduledProcedureStepStatus",
    "CommentsOnTheScheduledProcedureStep",
)

TOP_SUPPORTED = (
    # Requested Procedure
    "RequestedProcedureID",
    "RequestedProcedureDescription",
    "RequestedProcedureCodeSequence",
    "StudyInstanceUID",
    "ReferencedStudySequence",
    "RequestedProcedurePriority",
    "PatientTransportArrangements",
    "ReasonForTheRequestedProcedure",
    "RequestedProcedureComments",
    # Imaging Service Request
    "AccessionNumber",
    "RequestingPhysician",
    "ReferringPhysicianName",
    "ReasonForTheImagingServiceRequest",
    "ImagingServiceRequestComments",
    "RequestingService",
    "IssueDateOfImagingServiceRequest",
    "IssueTimeOfImagingServiceRequest",
    "PlacerOrderNumberImagingServiceRequest",
    "FillerOrderNumberImagingServiceRequest",
    "OrderEnteredBy",
    "OrderEntererLocation",
    # Visit Identification, Status, Relationship, Admission
    "AdmissionID",
    "CurrentPatientLocation",
    "PatientInstitutionResidence",
    "ReferencedPatientSequence",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence",
    "AdmittingDate",
    "AdmittingTime",
    # Patient Identification, Demographic, Medical
    *TOP_MATCHING,
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientWeight",
    "ConfidentialityConstraintOnPatientDataDescription",
    "Occupation",
    "PatientAddress",
    "CountryOfResidence",
    "PatientTelephoneNumbers",
    "EthnicGroup",
    "PatientReligiousPreference",
    "PatientComments",
    "PatientState",
    "PregnancyStatus",
    "MedicalAlerts",
    "Allergies",
    "SpecialNeeds",
    "SmokingStatus",
    "LastMenstrualDate",
)

# Other attributes of the modules K.6-1 lists: not returned, FF01.
SPS_OTHER = (
    "ScheduledProcedureStepEndDate",
    "ScheduledProcedureStepEndTime",
    "ScheduledPerformingPhysicianIdentificationSequence",
    "ScheduledStationNameCodeSequence",
    "ScheduledStationGeographicLocationCodeSequence",
    "ScheduledProcessingApplicationsCodeSequence",
    "ScheduledHumanPerformersSequence",
    "AnatomicalOrientationType",
)
TOP_OTHER = (
    "ReasonForRequestedProcedureCodeSequence",
    "StudyDate",
    "StudyTime",
    "RequestedProcedureLocation",
    "ConfidentialityCode",
    "ReportingPriority",
    "NamesOfIntendedRecipientsOfResults",
    "IntendedRecipientsOfResultsIdentificationSequence",
    "IssuerOfAccessionNumberSequence",
    "RequestingPhysicianIdentificationSequence",
    "ReferringPhysicianIdentificationSequence",
    "OrderCallbackPhoneNumber",
    "PlacerOrderNumberProcedure",
    "FillerOrderNumberProcedure",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionCodeSequence",
    "IssuerOfAdmissionIDSequence",
    "VisitStatusID",
    "VisitComments",
    "RouteOfAdmissions",
    "ReferencedVisitSequence",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "MedicalRecordLocator",
    "IssuerOfPatientIDQualifiersSequence",
    "PatientAge",
    "PatientBirthTime",
    "PatientSize",
    "MilitaryRank",
    "BranchOfService",
    "RegionOfResidence",
    "PatientInsurancePlanCodeSequence",
    "PatientPrimaryLanguageCodeSequence",
    "AdditionalPatientHistory",
    "PatientSexNeutered",
    "PertinentDocumentsSequence",
    "HL7StructuredDocumentReferenceSequence",
)
# Never matched, never cause FF01 or A900 (PS3.4 K.2.2.2).
CONTROL = ("SpecificCharacterSet", "TimezoneOffsetFromUTC")
SPS_SEQUENCE = "ScheduledProcedureStepSequence"


@dataclass(frozen=True)
class Key:
    keyword: str
    tag: int
    vr: str


def _keys(keywords: tuple[str, ...]) -> dict[int, Key]:
    out: dict[int, Key] = {}
    for keyword in keywords:
        tag = tag_for_keyword(keyword)
        if tag is None:  # pragma: no cover - a typo in the tables above
            raise ValueError(f"unknown keyword {keyword}")
        out[int(tag)] = Key(keyword, int(tag), str(dictionary_VR(tag)))
    return out


SPS_SUPPORTED_KEYS = _keys(SPS_SUPPORTED)
TOP_SUPPORTED_KEYS = _keys(TOP_SUPPORTED)
SPS_OTHER_KEYS = _keys(SPS_OTHER)
TOP_OTHER_KEYS = _keys(TOP_OTHER)
CONTROL_KEYS = _keys(CONTROL)
SPS_SEQUENCE_TAG = int(tag_for_keyword(SPS_SEQUENCE) or 0)


def key_table_markdown() -> str:
    """The statement's key table: every supported key, its matching and case rules."""
    matching = {
        "ScheduledStationAETitle": "Single Value, Wild Card, Universal; case-sensitive",
        "ScheduledProcedureStepStartDate": "Single Value, Range, Universal; with Start "
        "Time as one date-time range",
        "ScheduledProcedureStepStartTime": "Single Value, Range, Universal",
        "Modality": "Single Value, Wild Card, Universal; case-sensitive",
        "ScheduledPerformingPhysicianName": "Single Value, Wild Card, Universal; case-sensitive",
        "PatientName": "Single Value, Wild Card, Universal; case-insensitive",
        "PatientID": "Single Value, Wild Card, Universal; case-sensitive",
    }
    lines = [
        "| Attribute | Tag | VR | Matching | Returned |",
        "|---|---|---|---|---|",
        "| Scheduled Procedure Step Sequence | (0040,0100) | SQ | Sequence: one item per "
        "response | Yes |",
    ]

    def rows(keys: dict[int, Key], prefix: str) -> None:
        from pydicom.datadict import dictionary_description

        for key in keys.values():
            rule = matching.get(key.keyword, "None (return key only)")
            name = dictionary_description(key.tag)
            lines.append(
                f"| {prefix}{name} | ({key.tag >> 16:04X},{key.tag & 0xFFFF:04X}) | "
                f"{key.vr} | {rule} | Yes |"
            )

    rows(SPS_SUPPORTED_KEYS, ">")
    rows(TOP_SUPPORTED_KEYS, "")
    return "\n".join(lines)
