"""Print server statuses, UIDs and value sets (PS3.2-2008 Annex E, as the digest resolves it).

Every status the print SCP can answer is a row here; a handler returns a row, never
a bare number. Conditions are printed verbatim in the statement.
"""

from __future__ import annotations

from servers.core.declaration import FAILURE, SUCCESS, WARNING, StatusRow, StatusTable

# PS3.4 Annex H (UID names come from pydicom's dictionary in the statement).
META = "1.2.840.10008.5.1.1.9"
FILM_SESSION = "1.2.840.10008.5.1.1.1"
FILM_BOX = "1.2.840.10008.5.1.1.2"
IMAGE_BOX = "1.2.840.10008.5.1.1.4"
PRINTER = "1.2.840.10008.5.1.1.16"
PRINTER_INSTANCE = "1.2.840.10008.5.1.1.17"
PLUT = "1.2.840.10008.5.1.1.23"
CONFIGURATION = "1.2.840.10008.5.1.1.16.376"
CONFIGURATION_INSTANCE = "1.2.840.10008.5.1.1.17.376"
PRINT_JOB = "1.2.840.10008.5.1.1.14"
ANNOTATION_BOX = "1.2.840.10008.5.1.1.15"

# --- value sets ([T E.4.2-14], [T E.4.2-19], [T E.4.2-26]) ------------------------------
PRIORITIES = ("HIGH", "MED", "LOW")
MEDIUM_TYPES = ("CLEAR FILM", "BLUE FILM", "PAPER", "CURRENT")
FILM_DESTINATIONS = ("MAGAZINE", "PROCESSOR", "CURRENT")
ORIENTATIONS = ("PORTRAIT", "LANDSCAPE")
FILM_SIZES = ("8INX10IN", "11INX14IN", "14INX17IN", "CURRENT")
MAGNIFICATIONS = ("REPLICATE", "BILINEAR", "CUBIC", "NONE")
ANNOTATION_FORMATS = ("LABEL", "BOTTOM", "COMBINED", "NONE")
BORDER_DENSITIES = ("WHITE", "BLACK")
TRIMS = ("YES", "NO")
POLARITIES = ("NORMAL", "REVERSE")
LUT_SHAPES = ("IDENTITY", "LIN OD")
OVERSIZE_POLICIES = ("DEMAGNIFY", "CROP", "DECIMATE", "FAIL")

# Printable matrix, columns x rows in PORTRAIT ([T E.4.4-2]; 11x14 transposed, AMB-35).
FILM_MATRIX: dict[str, tuple[int, int]] = {
    "8INX10IN": (2286, 2836),
    "11INX14IN": (3195, 4096),
    "14INX14IN": (4096, 4108),
    "14INX17IN": (4096, 5120),
}
FILM_INCHES: dict[str, tuple[float, float]] = {
    "8INX10IN": (8.0, 10.0),
    "11INX14IN": (11.0, 14.0),
    "14INX14IN": (14.0, 14.0),
    "14INX17IN": (14.0, 17.0),
}

# Printer Status Info terms and the status each one reports (digest §8.4, N-GET column).
PRINTER_CONDITIONS: dict[str, str] = {
    "NORMAL": "NORMAL",
    **{
        info: "WARNING"
        for info in (
            "PRINTER INIT",
            "SUPPLY LOW",
            "NO SUPPLY MGZ",
            "BAD SUPPLY MGZ",
            "FILM JAM",
            "SUPPLY EMPTY",
            "COVER OPEN",
            "ELEC DOWN",
            "PROC INIT",
        )
    },
    **{
        info: "FAILURE"
        for info in (
            "CHECK PRINTER",
            "ELEC CONFIG ERR",
            "ELEC SW ERROR",
            "PRINTER OFFLINE",
            "PRINTER DOWN",
            "CALIBRATION ERR",
            "FILM TRANS ERR",
            "PROC DOWN",
            "UNKNOWN",
        )
    },
}
PRINTER_EVENT_IDS = {"NORMAL": 1, "WARNING": 2, "FAILURE": 3}
JOB_EVENT_IDS = {"PENDING": 1, "PRINTING": 2, "DONE": 3, "FAILURE": 4}


def row(code: int, category: str, meaning: str, condition: str) -> StatusRow:
    return StatusRow(code, category, meaning, condition)


DATABASE_COMMENT = "Print database unavailable"


def undecodable(what: str, database: str = "") -> StatusRow:
    """0110 for a request data set that cannot be decoded (N-CREATE and N-SET), and for a
    database failure where the operation reads the database (``database`` says what for)."""
    also = (
        f" Also sent when the print database cannot be read ({database}): Error Comment "
        f'is "{DATABASE_COMMENT}" and nothing was {what}.'
        if database
        else ""
    )
    return row(
        0x0110,
        FAILURE,
        "Processing Failure",
        "The request's data set cannot be decoded in the negotiated transfer syntax (for "
        "example a sequence or item that is never closed, or a value whose length does not "
        "fit its VR); Error Comment says so and nothing was " + what + "." + also,
    )


def database_failure(condition: str) -> StatusRow:
    """0110 for an operation that needs the print database while it is unavailable."""
    return row(
        0x0110,
        FAILURE,
        "Processing Failure",
        f"The print database cannot be read or written ({condition}); Error Comment is "
        f'"{DATABASE_COMMENT}". The operation works again as soon as the database is back, '
        "without a restart.",
    )


# --- Basic Grayscale Print Management Meta: Film Session, Film Box, Image Box, Printer ----

META_N_CREATE = StatusTable(
    "N-CREATE",
    [
        row(
            0x0000,
            SUCCESS,
            "Success",
            "A Basic Film Session or Basic Film Box was created with every attribute as "
            "requested; the response returns the attributes' actual values and, for a Film "
            "Box, the Referenced Image Box Sequence (and Referenced Basic Annotation Box "
            "Sequence when the Annotation Box SOP class was negotiated).",
        ),
        row(
            0x0116,
            WARNING,
            "Attribute Value Out of Range",
            "An attribute of the Film Session or Film Box attribute tables had a value outside "
            "its valid range (including a Film Session Label longer than 64 characters, which "
            "is truncated); the instance was created with the default in its place and the "
            "response data set holds only the attributes in question, with the values applied "
            "(for a Film Box also the Referenced Film Session, Image Box and Annotation Box "
            "sequences).",
        ),
        row(
            0x0107,
            WARNING,
            "Attribute List Error",
            "The request held attributes the SOP class does not support here (for example "
            "Owner ID, Empty Image Density, Requested Resolution ID or any unknown tag); they "
            "were ignored, the instance was created, and their tags are named in Error "
            "Comment (0000,0902).",
        ),
        row(
            0xB600,
            WARNING,
            "Memory allocation not supported",
            "A Film Session N-CREATE held Memory Allocation (2000,0060); it was ignored and "
            "the session was created. A data set is returned with the valid attributes.",
        ),
        row(
            0xB605,
            WARNING,
            "Min/Max Density out-range",
            "A Film Box N-CREATE requested a Min Density outside the printer's range "
            "(0 to 50 hundredths of OD); the film box was created with the nearest limit.",
        ),
        row(
            0x0106,
            FAILURE,
            "Invalid attribute value",
            "A Film Box N-CREATE had an Image Display Format that is not STANDARD\\C,R, "
            "ROW\\R1,... or COL\\C1,... with positive counts, a Referenced Film Session "
            "Sequence that does not name this association's film session, or a Referenced "
            "Presentation LUT Sequence that does not name one live Presentation LUT of this "
            "association; or a Film Session N-CREATE named a Specific Character Set other than "
            "ISO_IR 100 or ISO_IR 144. Nothing was created.",
        ),
        row(
            0x0111,
            FAILURE,
            "Duplicate SOP instance",
            "The Affected SOP Instance UID the SCU supplied is already in use.",
        ),
        row(
            0x0120,
            FAILURE,
            "Missing attribute",
            "A Film Box N-CREATE lacks Image Display Format or Referenced Film Session "
            "Sequence; their tags are named in Error Comment. Nothing was created.",
        ),
        row(
            0x0121,
            FAILURE,
            "Missing attribute value",
            "A Film Box N-CREATE holds Image Display Format with no value. Nothing was created.",
        ),
        row(
            0x0213,
            FAILURE,
            "Resource limitation",
            "A Film Session N-CREATE on an association that already has a film session, or a "
            "Film Box N-CREATE on an association without one.",
        ),
        row(
            0x0118,
            FAILURE,
            "No such SOP Class",
            "The Affected SOP Class UID on the Meta SOP class context is neither Basic Film "
            "Session nor Basic Film Box (Image Boxes and the Printer are created by the SCP).",
        ),
        undecodable("created", "the check that a requested SOP Instance UID is not in use"),
    ],
)

META_N_SET = StatusTable(
    "N-SET",
    [
        row(
            0x0000,
            SUCCESS,
            "Success",
            "The Film Session, Film Box or Image Box was updated as requested; the actual "
            "values of the attributes are returned.",
        ),
        row(
            0x0116,
            WARNING,
            "Attribute Value Out of Range",
            "A Film Session or Film Box attribute was outside its valid range, a Film Box Min "
            "Density was outside 0 to 50 (clamped), or an Image Box Magnification Type, "
            "Smoothing Type, Pixel Aspect Ratio or Requested Image Size was invalid; the "
            "default (or limit) was applied and only the attributes in question are returned.",
        ),
        row(
            0x0107,
            WARNING,
            "Attribute List Error",
            "A Film Box N-SET held an attribute that cannot be set after creation (Image "
            "Display Format, Film Orientation, Film Size ID, Annotation Display Format ID), or "
            "a Film Session or Film Box N-SET held an unsupported attribute; those were ignored, "
            "the others applied, and the ignored tags are returned in (0000,1005).",
        ),
        row(
            0xB600,
            WARNING,
            "Memory allocation not supported",
            "A Film Session N-SET held Memory Allocation (2000,0060); it was ignored and the "
            "other attributes applied.",
        ),
        row(
            0xB604,
            WARNING,
            "Image larger then Image Box",
            "An Image Box N-SET image is larger than its box at magnification 1 (or with "
            "Magnification Type NONE) and the oversize policy is DEMAGNIFY: the image will be "
            "de-magnified to fit.",
        ),
        row(
            0xB609,
            WARNING,
            "Image larger then Image Box",
            "As for B604, with oversize policy CROP: the image will be clipped to fit.",
        ),
        row(
            0xB60A,
            WARNING,
            "Image larger then Image Box",
            "As for B604, with oversize policy DECIMATE: the image will be decimated to fit.",
        ),
        row(
            0x0106,
            FAILURE,
            "Invalid attribute value",
            "An Image Box N-SET had an Image Box Position that is not this box's position, "
            "pixel attributes outside the table (Samples per Pixel not 1, Photometric "
            "Interpretation not MONOCHROME1/2, Bits Allocated not 8 or 16, Bits Stored not "
            "8 to 16 or above Bits Allocated, High Bit not Bits Stored - 1, zero Rows or "
            "Columns, Pixel Data of the wrong length), an invalid Polarity, a Presentation LUT "
            "reference that is unknown, deleted, or has a number of entries other than "
            "2^Bits Stored; or a Film Box N-SET named an unknown Presentation LUT. Nothing "
            "was changed.",
        ),
        row(
            0x0112,
            FAILURE,
            "No such object instance",
            "The Requested SOP Instance UID is not a Film Session, Film Box or Image Box of "
            "this association, or names a Film Box (or its Image Box) that is no longer the "
            "last one created.",
        ),
        row(
            0x0120,
            FAILURE,
            "Missing attribute",
            "An Image Box N-SET lacks Image Box Position, or its Basic Grayscale Image "
            "Sequence item lacks a pixel attribute or Pixel Data; the tags are returned in "
            "(0000,1005). Nothing was changed.",
        ),
        row(
            0x0121,
            FAILURE,
            "Missing attribute value",
            "An Image Box N-SET holds Image Box Position with no value. Nothing was changed.",
        ),
        row(
            0xC603,
            FAILURE,
            "Image size doesn't match",
            "An Image Box N-SET image has more rows or columns than the film's printable "
            "matrix, or is larger than its box and the oversize policy is FAIL. Nothing was "
            "changed.",
        ),
        undecodable("changed"),
    ],
)

META_N_ACTION = StatusTable(
    "N-ACTION",
    [
        row(
            0x0000,
            SUCCESS,
            "Success",
            "Film Session: all its films, Film Box: its film, were accepted for printing; a "
            "Print Job was created and is returned in Referenced Print Job Sequence "
            "(2100,0500).",
        ),
        row(
            0xB602,
            WARNING,
            "Empty film page",
            "A Film Session N-ACTION where at least one film box holds no image: those pages "
            "are skipped. If no page is printable, no Print Job is created.",
        ),
        row(
            0xB603,
            WARNING,
            "Empty Film Page",
            "A Film Box N-ACTION on a film box that holds no image: the empty page is not "
            "printed and no Print Job is created.",
        ),
        row(
            0xB604,
            WARNING,
            "Image larger then Image Box",
            "A printed image is larger than its box and the oversize policy is DEMAGNIFY; it "
            "is de-magnified. The Print Job was created.",
        ),
        row(
            0xB609,
            WARNING,
            "Image larger then Image Box",
            "As for B604 with oversize policy CROP; the image is clipped.",
        ),
        row(
            0xB60A,
            WARNING,
            "Image larger then Image Box",
            "As for B604 with oversize policy DECIMATE; the image is decimated.",
        ),
        row(
            0x0112,
            FAILURE,
            "No such object instance",
            "The Requested SOP Instance UID is not this association's film session, or not "
            "its last-created film box.",
        ),
        row(
            0x0211,
            FAILURE,
            "Invalid operation",
            "The Action Type ID is not 1 (PRINT).",
        ),
        row(
            0xC600,
            FAILURE,
            "Processing failure",
            "A Film Session N-ACTION on a session that holds no film box.",
        ),
        row(
            0xC601,
            FAILURE,
            "OUT of Resources",
            "A Film Session N-ACTION while the print queue already holds `max_queued_jobs` "
            "unfinished jobs; nothing is queued.",
        ),
        row(
            0xC602,
            FAILURE,
            "Out of Resources",
            "A Film Box N-ACTION while the print queue already holds `max_queued_jobs` "
            "unfinished jobs; nothing is queued.",
        ),
        row(
            0xC613,
            FAILURE,
            "Wrong Print Image size",
            "An image's Requested Image Size (mm) is wider than its image box on the film; "
            "nothing is printed and no Print Job is created.",
        ),
        row(
            0x0213,
            FAILURE,
            "Resource limitation",
            "A Film Session N-ACTION on a session with more film boxes than the maximum "
            "number of collated films; nothing is queued.",
        ),
        database_failure("counting the queue or recording the Print Job; nothing is queued"),
    ],
)

META_N_DELETE = StatusTable(
    "N-DELETE",
    [
        row(
            0x0000,
            SUCCESS,
            "Success",
            "The film session (with its whole hierarchy) or the last-created film box (with "
            "its image and annotation boxes) was deleted. Print jobs already queued are kept.",
        ),
        row(
            0x0112,
            FAILURE,
            "No such object instance",
            "The Requested SOP Instance UID is not this association's film session nor its "
            "last-created film box. The association is not aborted.",
        ),
    ],
)

META_N_GET = StatusTable(
    "N-GET",
    [
        row(
            0x0000,
            SUCCESS,
            "Success",
            "Printer N-GET: the requested (or, with an empty list, all supported) printer "
            "attributes are returned.",
        ),
        row(
            0x0107,
            WARNING,
            "Attribute List Error",
            "Printer N-GET asked for attributes the Printer does not provide (including Date "
            "and Time of Last Calibration); their tags are returned in (0000,1005) with the "
            "supported attributes.",
        ),
        row(
            0x0112,
            FAILURE,
            "No such object instance",
            "The Requested SOP Instance UID is not the Printer SOP Instance "
            "1.2.840.10008.5.1.1.17.",
        ),
        database_failure("the printer status is kept there"),
    ],
)

# --- Presentation LUT ---------------------------------------------------------------------

PLUT_N_CREATE = StatusTable(
    "N-CREATE",
    [
        row(0x0000, SUCCESS, "Success", "The Presentation LUT was created."),
        row(
            0x0106,
            FAILURE,
            "Invalid attribute value",
            "Both Presentation LUT Sequence and Presentation LUT Shape were sent, the shape is "
            "not IDENTITY or LIN OD, or the LUT Descriptor or LUT Data is invalid (entries "
            "not 2^k for 8 <= k <= 16 or not matching the data, first mapped value not 0, bit "
            "depth outside 10 to 16, a value above 2^bits - 1, more than one item). The "
            "sample's 0107 and 0108 are replaced by this code; Error Comment gives the "
            "sample's reason. Nothing was created.",
        ),
        row(
            0x0120,
            FAILURE,
            "Missing attribute",
            "Neither Presentation LUT Sequence nor Presentation LUT Shape was sent, or the "
            "sequence item lacks LUT Descriptor or LUT Data.",
        ),
        undecodable("created", "the check that a requested SOP Instance UID is not in use"),
    ],
)

PLUT_N_DELETE = StatusTable(
    "N-DELETE",
    [
        row(
            0x0000,
            SUCCESS,
            "Success",
            "The Presentation LUT was deleted; if a film box or image box still references it, "
            "it lives on for them but can no longer be newly referenced.",
        ),
        row(
            0x0112,
            FAILURE,
            "No such object instance",
            "The UID is not a live Presentation LUT of this association.",
        ),
    ],
)

# --- Basic Annotation Box -----------------------------------------------------------------

ANNOTATION_N_SET = StatusTable(
    "N-SET",
    [
        row(0x0000, SUCCESS, "Success", "The annotation text was set (or cleared)."),
        row(
            0x0116,
            WARNING,
            "Attribute Value Out of Range",
            "Text String longer than 64 characters; it was truncated to 64 and is returned.",
        ),
        row(
            0x0106,
            FAILURE,
            "Invalid attribute value",
            "Annotation Position is not this box's position for the film box's Annotation "
            "Display Format.",
        ),
        row(
            0x0112,
            FAILURE,
            "No such object instance",
            "The UID is not an annotation box of the association's last-created film box.",
        ),
        row(
            0x0120,
            FAILURE,
            "Missing attribute",
            "Annotation Position is absent; its tag is returned in (0000,1005).",
        ),
        undecodable("changed"),
    ],
)

# --- Print Job and Printer Configuration Retrieval -----------------------------------------

PRINT_JOB_N_GET = StatusTable(
    "N-GET",
    [
        row(
            0x0000,
            SUCCESS,
            "Success",
            "The print job's requested (or all) attributes are returned, from any association.",
        ),
        row(
            0x0107,
            WARNING,
            "Attribute List Error",
            "Attributes the Print Job does not provide were requested; their tags are returned "
            "in (0000,1005) with the supported attributes.",
        ),
        row(
            0x0112,
            FAILURE,
            "No such object instance",
            "No print job with that UID exists (never created, or deleted after its Done or "
            "Failure event was confirmed, or older than the retention time).",
        ),
        database_failure("print jobs are kept there"),
    ],
)

CONFIGURATION_N_GET = StatusTable(
    "N-GET",
    [
        row(0x0000, SUCCESS, "Success", "The Printer Configuration Sequence is returned."),
        row(
            0x0107,
            WARNING,
            "Attribute List Error",
            "Attributes other than Printer Configuration Sequence were requested; their tags "
            "are returned in (0000,1005) with the sequence.",
        ),
        row(
            0x0112,
            FAILURE,
            "No such object instance",
            "The Requested SOP Instance UID is not 1.2.840.10008.5.1.1.17.376.",
        ),
    ],
)
