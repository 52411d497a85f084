"""host locks: one deployment, backout or recover at a time per host

Revision ID: issue17_host_locks
Revises: issue18_release_evidence
"""

import sqlalchemy as sa
from alembic import op

revision = "issue17_host_locks"
down_revision = "issue18_release_evidence"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "host_locks",
        sa.Column("host", sa.String(length=200), nullable=False),
        sa.Column("token", sa.String(length=64), nullable=False),
        sa.Column("purpose", sa.String(length=20), nullable=False),
        sa.Column("deployment_id", sa.Integer(), nullable=True),
        sa.Column("release", sa.String(length=300), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("machine", sa.String(length=200), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("pid_start", sa.String(length=40), nullable=False),
        sa.Column("acquired_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("host"),
    )


def downgrade() -> None:
    op.drop_table("host_locks")
