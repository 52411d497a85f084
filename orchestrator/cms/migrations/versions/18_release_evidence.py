"""release evidence: acceptance results, pilot verdicts and sign-offs per environment

Revision ID: issue18_release_evidence
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "issue18_release_evidence"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "release_evidence",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("release", sa.String(length=300), nullable=False),
        sa.Column("digest", sa.String(length=80), nullable=False),
        sa.Column("environment", sa.String(length=100), nullable=False),
        sa.Column("deployment_id", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("scope", sa.String(length=20), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("type", sa.String(length=40), nullable=True),
        sa.Column("host", sa.String(length=200), nullable=True),
        sa.Column("passed", sa.Boolean(), nullable=False),
        sa.Column("output", sa.Text(), nullable=False),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        op.f("ix_release_evidence_digest"), "release_evidence", ["digest"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_release_evidence_digest"), table_name="release_evidence")
    op.drop_table("release_evidence")
