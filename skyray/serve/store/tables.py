"""The store's tables at the current schema version (what ``migrations`` builds), for SQLAlchemy Core queries."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

jobs = sa.Table(
    "jobs", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("owner", sa.Text, nullable=False),  # sha256 of the bearer token that created it ('' without auth)
    sa.Column("kind", sa.Text, nullable=False),  # 'shot' or 'film'
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("storyboard", sa.Text, nullable=False),  # resolved storyboard as JSON (storyboard_from_data input)
    sa.Column("video", sa.Text, nullable=False),  # the job's mp4, relative to its folder
    sa.Column("parent", sa.Text),  # continue_from job id
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("started", sa.Float),
    sa.Column("finished", sa.Float),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("dispatched", sa.Integer, nullable=False),
    sa.Column("restarts", sa.Integer, nullable=False),
    sa.Column("cancel_requested", sa.Integer, nullable=False),
    sa.Column("windows_done", sa.Integer, nullable=False),
    sa.Column("windows_total", sa.Integer, nullable=False),
    sa.Column("shot", sa.Text),
    sa.Column("eta", sa.Float),
    sa.Column("error", sa.Text),
    sa.Column("frames", sa.Integer, nullable=False),  # frames the job renders (for the per-day quota)
    sa.Column("expires_at", sa.Float),  # when a finished job's files and row are deleted (None: kept)
    sa.Column("dispatcher", sa.Text),  # the ingress dispatcher that claimed it (its heartbeat keeps it claimed)
)

events = sa.Table(
    "events", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job", sa.Text, nullable=False),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("data", sa.Text, nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
)

dispatchers = sa.Table(
    "dispatchers", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("seen", sa.Float, nullable=False),
)

usage = sa.Table(
    "usage", metadata,
    sa.Column("job", sa.Text, primary_key=True),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("frames", sa.Integer, nullable=False),
)

expired_jobs = sa.Table(
    "expired_jobs", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("expired", sa.Float, nullable=False),
)
