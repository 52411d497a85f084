"""CI provenance on RFCs (the pipeline, job, commit and actor that raised it)

Revision ID: issue15_ci_provenance
Revises: issue17_host_locks
"""

import sqlalchemy as sa
from alembic import op

revision = "issue15_ci_provenance"
down_revision = "issue17_host_locks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rfcs") as batch:
        batch.add_column(sa.Column("ci", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rfcs") as batch:
        batch.drop_column("ci")
