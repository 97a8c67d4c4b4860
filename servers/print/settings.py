"""The print service's settings: ``[services.print]`` over these defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from servers.core.declaration import StartupError
from servers.print.tables import FILM_MATRIX, MAGNIFICATIONS, OVERSIZE_POLICIES


@dataclass(frozen=True)
class PrintSettings:
    default_magnification_type: str = "BILINEAR"
    default_smoothing_type: int = 0
    default_min_density: int = 20
    default_max_density: int = 320
    oversize_policy: str = "DEMAGNIFY"
    max_collated_films: int = 12
    max_queued_jobs: int = 100
    max_image_boxes_per_film: int = 100
    max_memory_allocation_kb: int = 1048576
    loaded_film_size: str = "14INX17IN"
    loaded_medium: str = "CLEAR FILM"
    printing_bit_depth: int = 12
    render_scale: float = 0.25
    printer_name: str = "VIRTUAL_PRINTER"
    manufacturer: str = "DICOMLAB"
    model_name: str = "VIRTUAL FILM"
    serial_number: str = "00000001"
    software_version: str = "0.1"
    retry_count: int = 3
    retry_delay_s: float = 60.0
    job_retention_s: float = 3600.0
    event_reports_printer: bool = True
    event_reports_print_job: bool = True
    event_timeout_s: float = 60.0
    printer_poll_s: float = 0.5
    font_path: str = ""

    @classmethod
    def load(cls, raw: dict[str, Any]) -> PrintSettings:
        names = {f.name: f for f in fields(cls)}
        unknown = set(raw) - set(names)
        if unknown:
            raise StartupError(
                f"[services.print] has unknown settings: {', '.join(sorted(unknown))}"
            )
        values = {k: type(getattr(cls(), k))(v) for k, v in raw.items()}
        settings = cls(**values)
        if settings.oversize_policy not in OVERSIZE_POLICIES:
            raise StartupError(
                f"[services.print] oversize_policy must be one of {OVERSIZE_POLICIES}"
            )
        if settings.default_magnification_type not in MAGNIFICATIONS:
            raise StartupError(
                f"[services.print] default_magnification_type must be one of {MAGNIFICATIONS}"
            )
        if settings.loaded_film_size not in FILM_MATRIX:
            raise StartupError(
                f"[services.print] loaded_film_size must be one of {tuple(FILM_MATRIX)}"
            )
        if settings.printing_bit_depth not in (8, 12):
            raise StartupError("[services.print] printing_bit_depth must be 8 or 12")
        for key, limit in (
            ("printer_name", 16),
            ("manufacturer", 16),
            ("model_name", 16),
            ("serial_number", 8),
            ("software_version", 6),
        ):
            if len(getattr(settings, key)) > limit:
                raise StartupError(f"[services.print] {key} is limited to {limit} characters")
        return settings

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
