"""pull deployment: agents (hashed tokens, heartbeats), desired state, reports

Revision ID: issue12_pull_agents
Revises: issue15_ci_provenance
"""

import sqlalchemy as sa
from alembic import op

revision = "issue12_pull_agents"
down_revision = "issue15_ci_provenance"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pull_agents",
        sa.Column("host", sa.String(length=200), nullable=False),
        sa.Column("token_salt", sa.String(length=64), nullable=False),
        sa.Column("token_hash", sa.String(length=128), nullable=False),
        sa.Column("issued_at", sa.DateTime(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=True),
        sa.Column("heartbeat", sa.JSON(), nullable=False),
        sa.Column("nudge", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("host"),
    )
    op.create_table(
        "pull_desired",
        sa.Column("host", sa.String(length=200), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("environment", sa.String(length=100), nullable=False),
        sa.Column("deployment_id", sa.Integer(), nullable=True),
        sa.Column("purpose", sa.String(length=20), nullable=False),
        sa.Column("release", sa.String(length=300), nullable=True),
        sa.Column("digest", sa.String(length=80), nullable=True),
        sa.Column("release_id", sa.String(length=300), nullable=True),
        sa.Column("apply", sa.String(length=20), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("set_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("host"),
    )
    op.create_index(
        op.f("ix_pull_desired_generation"), "pull_desired", ["generation"], unique=False
    )
    op.create_table(
        "pull_reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("host", sa.String(length=200), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("deployment_id", sa.Integer(), nullable=True),
        sa.Column("release_id", sa.String(length=300), nullable=True),
        sa.Column("step", sa.String(length=40), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_pull_reports_host"), "pull_reports", ["host"], unique=False)
    op.create_index(
        op.f("ix_pull_reports_deployment_id"), "pull_reports", ["deployment_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_pull_reports_deployment_id"), table_name="pull_reports")
    op.drop_index(op.f("ix_pull_reports_host"), table_name="pull_reports")
    op.drop_table("pull_reports")
    op.drop_index(op.f("ix_pull_desired_generation"), table_name="pull_desired")
    op.drop_table("pull_desired")
    op.drop_table("pull_agents")
