"""print server: print jobs, films, printer state

Revision ID: 0003_print
Revises: 0001
Create Date: 2026-11-23 14:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_print"
down_revision: str | None = "0002_ris"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "print_job",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_uid", sa.String(length=64), nullable=False),
        sa.Column("job_number", sa.String(length=16), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "PENDING",
                "PRINTING",
                "DONE",
                "FAILURE",
                name="printjobstate",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("status_info", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.String(length=16), nullable=False),
        sa.Column("originator", sa.String(length=16), nullable=False),
        sa.Column("called_ae", sa.String(length=16), nullable=False),
        sa.Column("film_session_uid", sa.String(length=64), nullable=False),
        sa.Column("film_session_label", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("copies", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("pdf_path", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_print_job")),
        sa.UniqueConstraint("job_uid", name=op.f("uq_print_job_job_uid")),
    )
    op.create_table(
        "print_film",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_pk", sa.Integer(), nullable=False),
        sa.Column("sheet", sa.Integer(), nullable=False),
        sa.Column("film_box_uid", sa.String(length=64), nullable=False),
        sa.Column("copy", sa.Integer(), nullable=False),
        sa.Column("film_size", sa.String(length=16), nullable=False),
        sa.Column("orientation", sa.String(length=16), nullable=False),
        sa.Column("display_format", sa.String(length=64), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("png_path", sa.String(length=255), nullable=False),
        sa.Column("density_path", sa.String(length=255), nullable=False),
        sa.Column("sidecar_path", sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_pk"], ["print_job.id"], name=op.f("fk_print_film_job_pk_print_job")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_print_film")),
        sa.UniqueConstraint("job_pk", "sheet", name=op.f("uq_print_film_job_pk")),
    )
    with op.batch_alter_table("print_film", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_print_film_job_pk"), ["job_pk"], unique=False)
    op.create_table(
        "printer_state",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("status_info", sa.String(length=16), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_printer_state")),
    )


def downgrade() -> None:
    op.drop_table("printer_state")
    with op.batch_alter_table("print_film", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_print_film_job_pk"))
    op.drop_table("print_film")
    op.drop_table("print_job")
