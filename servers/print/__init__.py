"""Print server: Basic Grayscale Print Management with Presentation LUT (PS3.2-2008 Annex E).

Five declarations share one :class:`~servers.print.scp.PrintServer` per AE: the
Basic Grayscale Print Management Meta SOP class (Film Session, Film Box, Grayscale
Image Box and Printer travel on its context), Basic Annotation Box, Print Job,
Presentation LUT and Printer Configuration Retrieval, each on its own context.
pynetdicom's PrintManagementServiceClass carries the DIMSE-N messages; the handlers
dispatch on the Affected/Requested SOP Class UID.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pynetdicom import evt

from servers.core.config import Config
from servers.core.context import ServiceContext
from servers.core.declaration import (
    ContextRow,
    ServiceDeclaration,
    StatementSection,
    StatusTable,
)
from servers.core.hookspecs import hookimpl
from servers.core.transfer_syntax import EXPLICIT_VR_LE, IMPLICIT_VR_LE
from servers.print import tables as t
from servers.print.jobs import start_worker
from servers.print.scp import PrintServer, handler_map
from servers.print.settings import PrintSettings

SYNTAXES = (EXPLICIT_VR_LE, IMPLICIT_VR_LE)


def server_for(ctx: ServiceContext) -> PrintServer:
    """The one PrintServer of ``ctx``'s AE in this suite."""
    servers: dict[str, PrintServer] = ctx.suite.__dict__.setdefault("_print_servers", {})
    server = servers.get(ctx.ae.key)
    if server is None:
        settings = PrintSettings.load(dict(ctx.config.service_settings("print")))
        server = PrintServer(ctx, settings)
        servers[ctx.ae.key] = server
    return server


def _factory(
    statuses: Mapping[str, StatusTable], lifecycle: bool = False
) -> Callable[[ServiceContext], Mapping[Any, Callable[..., Any]]]:
    def handlers(ctx: ServiceContext) -> Mapping[Any, Callable[..., Any]]:
        server = server_for(ctx)
        out = handler_map(server, statuses)
        if lifecycle:
            out[evt.EVT_ESTABLISHED] = server.on_established
            out[evt.EVT_RELEASED] = server.on_end
            out[evt.EVT_ABORTED] = server.on_end
            out[evt.EVT_CONN_CLOSE] = server.on_end
        return out

    return handlers


def _background(ctx: ServiceContext) -> Any:
    return start_worker(server_for(ctx))


def _statement(s: PrintSettings) -> tuple[StatementSection, ...]:
    return (
        StatementSection(
            "Addresses",
            "The sample statement leaves the AE title to configuration and names TCP port "
            "104. The embedded default answers as PRINT_SCP on port 2104, which needs no root; "
            "the systemd deployment sets port 104 (`DICOMLAB_AE__PRINT_SCP__PORT=104`). The "
            "sample accepts only configured Print SCUs (others rejected 1/1/3); the embedded "
            "default's empty `calling_ae_allow` accepts any calling AE title so that a new "
            "installation can print at once. Verification on this AE uses the suite's "
            "Verification service and its transfer syntaxes.",
        ),
        StatementSection(
            "Object model",
            "Film Session, Film Box, Grayscale Image Box and Printer are reached through the "
            "Basic Grayscale Print Management Meta SOP Class context, with the component SOP "
            "class in the Affected/Requested SOP Class UID. One Film Session per association. "
            "Film Box N-CREATE creates one Image Box per position of the Image Display Format "
            "(STANDARD\\C,R: C columns by R rows, numbered row by row; ROW\\R1,R2,...: row i "
            "holds Ri boxes, numbered row by row; COL\\C1,C2,...: column j holds Cj boxes, "
            "numbered column by column) and the Annotation Boxes its Annotation Display Format "
            "ID calls for (LABEL: position 0; BOTTOM: 1..N; COMBINED: 0..N; NONE: none). A new "
            "Film Box makes the previous one inaccessible (0112 on N-SET, N-ACTION or N-DELETE "
            "of it or its boxes), but it stays in the session and is printed by a Film Session "
            "N-ACTION. The whole hierarchy and the association's Presentation LUTs live in "
            "memory and are discarded when the association is released or aborted; nothing "
            "is written before an N-ACTION, which copies the films into a Print Job in one "
            "transaction. An association aborted midway therefore leaves no partial job.",
        ),
        StatementSection(
            "Film Session attributes",
            "| Attribute | Valid values | Not sent | Invalid value |\n|---|---|---|---|\n"
            "| Number of Copies (2000,0010) | 1-99 | 1 | 1, warning 0116 |\n"
            "| Print Priority (2000,0020) | HIGH, MED, LOW | LOW | LOW, warning 0116 |\n"
            "| Medium Type (2000,0030) | CLEAR FILM, BLUE FILM, PAPER, CURRENT | CURRENT | "
            "CLEAR FILM, warning 0116 |\n"
            "| Film Destination (2000,0040) | MAGAZINE, PROCESSOR, CURRENT | MAGAZINE | "
            "MAGAZINE, warning 0116 |\n"
            "| Film Session Label (2000,0050) | up to 64 characters | empty | truncated to 64, "
            "warning 0116 |\n\n"
            "Memory Allocation (2000,0060) is not supported (warning B600). Any other attribute "
            "is ignored with warning 0107. The sample names CURRENT as the default when Medium "
            "Type is not sent and CLEAR FILM for an invalid value; both are kept (digest "
            "AMB-05). A medium or film size different from the loaded one is printed on the "
            f"loaded medium ({s.loaded_medium}, {s.loaded_film_size}).",
        ),
        StatementSection(
            "Film Box attributes",
            "| Attribute | Valid values | Not sent | Invalid value |\n|---|---|---|---|\n"
            "| Image Display Format (2010,0010) | STANDARD\\C,R; ROW\\R1,R2,...; COL\\C1,C2,... "
            f"(at most {s.max_image_boxes_per_film} positions) | failure 0120 | failure 0106 "
            "(0121 when empty) |\n"
            "| Film Orientation (2010,0040) | PORTRAIT, LANDSCAPE | PORTRAIT | PORTRAIT, 0116 |\n"
            "| Film Size ID (2010,0050) | 8INX10IN, 11INX14IN, 14INX17IN, CURRENT | CURRENT | "
            "14INX17IN, 0116 |\n"
            "| Magnification Type (2010,0060) | REPLICATE, BILINEAR, CUBIC, NONE | "
            f"{s.default_magnification_type} | {s.default_magnification_type}, 0116 |\n"
            "| Smoothing Type (2010,0080) | 0-15 (with CUBIC: 0 replicate, n a Gaussian of "
            f"0.1 x n pixels) | {s.default_smoothing_type} | {s.default_smoothing_type}, 0116 |\n"
            "| Max Density (2010,0130) | 170-350 | "
            f"{s.default_max_density} | 320, 0116 |\n"
            "| Min Density (2010,0120) | 0-50 | "
            f"{s.default_min_density} | nearest limit, B605 (N-CREATE) or 0116 (N-SET) |\n"
            "| Annotation Display Format ID (2010,0030) | LABEL, BOTTOM, COMBINED, NONE | NONE "
            "| NONE, 0116 |\n"
            "| Border Density (2010,0100) | WHITE, BLACK | BLACK | BLACK, 0116 |\n"
            "| Trim (2010,0140) | YES, NO | NO | NO, 0116 |\n"
            "| Illumination (2010,015E) | 1-65535 cd/m² | 2000 | 2000, 0116 |\n"
            "| Reflected Ambient Light (2010,0160) | 0-65535 cd/m² | 10 | 10, 0116 |\n"
            "| Configuration Information (2010,0150) | any | empty | stored, printed as "
            "identity |\n\n"
            "Image Display Format, Film Orientation, Film Size ID and Annotation Display Format "
            "ID cannot be changed by N-SET (warning 0107, other attributes applied). Empty "
            "Image Density, Requested Resolution ID and any other attribute are ignored with "
            "warning 0107.",
        ),
        StatementSection(
            "Image Box attributes",
            "Image Box Position must be the box's own position (0120 absent, 0121 empty, 0106 "
            "otherwise). The Basic Grayscale Image Sequence must hold one item with Samples per "
            "Pixel 1, Photometric Interpretation MONOCHROME1 or MONOCHROME2, Bits Allocated 8 "
            "or 16, Bits Stored 8 to 16 (extension beyond 8 and 12, as the sample says), High "
            "Bit = Bits Stored - 1, Pixel Representation 0 or 1 (signed data is offset by "
            "2^(Bits Stored - 1), an extension the sample implies), Rows and Columns at least 1 "
            "and no more than the film's printable matrix (C603 otherwise), and Pixel Data of "
            "Rows x Columns x Bits Allocated/8 bytes; a missing one gives 0120, an invalid one "
            "0106. An empty sequence clears the box. Polarity NORMAL or REVERSE (default "
            "NORMAL; invalid: failure 0106 as the sample says). Magnification Type, Smoothing "
            "Type, Pixel Aspect Ratio and Requested Image Size (mm, at most the film's width) "
            "that are invalid are ignored with warning 0116. A referenced Presentation LUT must "
            "have 2^Bits Stored entries (0106 otherwise). An image larger than its box in "
            f"printer pixels is handled by the oversize policy `{s.oversize_policy}` "
            "(DEMAGNIFY: B604, CROP: B609, DECIMATE: B60A, FAIL: C603).",
        ),
        StatementSection(
            "Printing and print jobs",
            "Film Session N-ACTION prints every film box of the session in creation order, "
            "Film Box N-ACTION the last-created one; Action Type ID must be 1. Each N-ACTION "
            "creates a Print Job (returned in Referenced Print Job Sequence (2100,0500)) that "
            "holds a copy of the films: later changes do not affect it, and it is printed even "
            "if the association ends. Each film is printed Number of Copies times, collated. "
            "Jobs are printed one at a time, HIGH before MED before LOW priority, first in "
            "first out. Execution Status goes PENDING (QUEUED) -> PRINTING (NORMAL) -> DONE "
            "(NORMAL); a job that cannot be rendered (including a full disk) ends FAILURE "
            "(ELEC SW ERROR) and the files already written for it are removed: a job's films "
            "are listed only once it is DONE. While the print database is unavailable the "
            "job being printed waits and carries on when it is back. Jobs the print server "
            "left PENDING or PRINTING when it was killed end FAILURE (PRINTER DOWN) at its "
            "next start (their films were held in memory), with any file written for them "
            "removed; one print server per database is assumed. While the "
            f"printer status is FAILURE a job waits PENDING, retried {s.retry_count} times "
            f"every {s.retry_delay_s:g} s, then ends FAILURE (UNKNOWN). A Print Job "
            "N-EVENT-REPORT (Pending 1, Printing 2, Done 3, Failure 4; with Execution Status "
            "Info, Print Job ID, Film Session Label and Printer Name) is sent on every change, "
            "on the creating association only, if it is still open and accepted the Print Job "
            "context. Print Job N-GET works from any association until the job has been "
            f"finished for {s.job_retention_s:g} s; the job and its films stay listed by "
            "`dicomlab print jobs` (the sample's deletion after a confirmed Done or Printing "
            "event would break the N-GET tracking it also describes).",
        ),
        StatementSection(
            "Printer status",
            "Printer N-GET returns Printer Status, Printer Status Info, Printer Name, "
            "Manufacturer, Manufacturer Model Name, Device Serial Number and Software Versions; "
            "Date and Time of Last Calibration are not supported. `dicomlab print status "
            "STATUS [INFO]` sets the virtual printer's status (NORMAL; WARNING with PRINTER "
            "INIT, SUPPLY LOW, NO SUPPLY MGZ, BAD SUPPLY MGZ, FILM JAM, SUPPLY EMPTY, COVER "
            "OPEN, ELEC DOWN or PROC INIT; FAILURE with CHECK PRINTER, ELEC CONFIG ERR, ELEC SW "
            "ERROR, PRINTER OFFLINE, PRINTER DOWN, CALIBRATION ERR, FILM TRANS ERR, PROC DOWN "
            "or UNKNOWN). Each change is sent as a Printer N-EVENT-REPORT (Normal 1 without "
            "attributes; Warning 2 and Failure 3 with Printer Status, Printer Status Info and "
            "Printer Name) to every open association that accepted the Meta SOP Class context. "
            "NORMAL and WARNING let jobs print (a warning is logged); FAILURE holds them.",
        ),
        StatementSection(
            "Presentation LUT and grayscale",
            "Presentation LUT N-CREATE takes either Presentation LUT Shape (IDENTITY or LIN OD) "
            "or a Presentation LUT Sequence with one item (LUT Descriptor: 2^k entries for 8 <= "
            "k <= 16, first mapped value 0, 10 to 16 bits; LUT Data with that many entries). "
            "The sample answers an invalid shape with 0107 and both present with 0108; 0107 is "
            "a warning in PS3.7 and 0108 does not exist, so both are answered 0106 with the "
            "sample's reason in Error Comment; neither present gives 0120. B605 cannot arise "
            "and is not sent. A deleted P-LUT stays in effect for the boxes that reference it. "
            "The virtual printer maps stored values through polarity (MONOCHROME1 and REVERSE "
            "invert), then the Image Box's P-LUT, else the Film Box's, else IDENTITY. IDENTITY "
            "and explicit LUTs give P-values that the Grayscale Standard Display Function "
            "(PS3.14) turns into optical density for the Film Box's Illumination and Reflected "
            "Ambient Light between its Min and Max Density; LIN OD maps the lowest value to Max "
            "Density and the highest to Min Density linearly. Densities are quantized to "
            f"{s.printing_bit_depth} bits. Configuration Information is stored and printed as "
            "identity; a P-LUT overrides it.",
        ),
        StatementSection(
            "Virtual printer output",
            "Each film is rendered at the printer's matrix for its size and orientation "
            "(8INX10IN 2286 x 2836, 11INX14IN 3195 x 4096, 14INX17IN 4096 x 5120 columns x "
            f"rows in portrait) times `render_scale` ({s.render_scale:g}), under "
            "`data_dir/films/job-NNNNNN/`: `film-NN.png` (8-bit, gray linear in the GSDF's JND "
            "index, so IDENTITY prints look like the input), `film-NN-density.png` (16-bit, "
            "optical density x 1000) and `film-NN.json` (effective attributes and where each "
            "image landed); `job.pdf` holds every sheet of the job in print order. Images are "
            "centred in their boxes, scaled to fit while keeping their aspect ratio, or printed "
            "at Requested Image Size; Border Density fills around and between images and empty "
            "boxes; Trim draws a one-pixel frame at the opposite density; annotations are "
            "written in a label band at the top (position 0) and under each image.",
        ),
        StatementSection(
            "Status codes not sent",
            "C616 (the session's N-ACTION is supported), B601 (collation is supported), C605 "
            "(images live in memory) and C603 at N-ACTION (an oversized image is refused at "
            "Image Box N-SET) are never sent. The sample's Film Session N-DELETE 0112 and "
            "Printer N-GET failure texts describe what the SCU does; the SCP answers and keeps "
            "the association. 0110 is answered to an N-CREATE or N-SET whose data set cannot "
            "be decoded; bytes after the last complete element too few to form an element "
            "header end the data set and are ignored. N-ACTION does not read Action "
            "Information: a data set sent with it is ignored.",
        ),
    )


def declarations(config: Config) -> list[ServiceDeclaration]:
    settings = PrintSettings.load(dict(config.service_settings("print")))
    meta = {
        "N-CREATE": t.META_N_CREATE,
        "N-SET": t.META_N_SET,
        "N-ACTION": t.META_N_ACTION,
        "N-DELETE": t.META_N_DELETE,
        "N-GET": t.META_N_GET,
    }
    plut = {"N-CREATE": t.PLUT_N_CREATE, "N-DELETE": t.PLUT_N_DELETE}
    annotation = {"N-SET": t.ANNOTATION_N_SET}
    job = {"N-GET": t.PRINT_JOB_N_GET}
    configuration = {"N-GET": t.CONFIGURATION_N_GET}
    return [
        ServiceDeclaration(
            name="print",
            title="Basic Grayscale Print Management Meta",
            accepted=(ContextRow(t.META, SYNTAXES),),
            statuses=meta,
            handlers=_factory(meta, lifecycle=True),
            settings=settings.as_dict(),
            statement=_statement(settings),
            background=_background,
        ),
        ServiceDeclaration(
            name="print_annotation",
            title="Basic Annotation Box",
            accepted=(ContextRow(t.ANNOTATION_BOX, SYNTAXES),),
            statuses=annotation,
            handlers=_factory(annotation),
        ),
        ServiceDeclaration(
            name="print_job",
            title="Print Job",
            accepted=(ContextRow(t.PRINT_JOB, SYNTAXES),),
            statuses=job,
            handlers=_factory(job),
        ),
        ServiceDeclaration(
            name="print_presentation_lut",
            title="Presentation LUT",
            accepted=(ContextRow(t.PLUT, SYNTAXES),),
            statuses=plut,
            handlers=_factory(plut),
        ),
        ServiceDeclaration(
            name="print_configuration",
            title="Printer Configuration Retrieval",
            accepted=(ContextRow(t.CONFIGURATION, SYNTAXES),),
            statuses=configuration,
            handlers=_factory(configuration),
        ),
    ]


@hookimpl
def dicomlab_services(config: Config) -> list[ServiceDeclaration]:
    return declarations(config)
