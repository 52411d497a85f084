"""The CMS: SQLAlchemy records of environments, hosts, releases, RFCs, deployments, baselines
and the tamper-evident audit log. `orchestrator.cms.db` opens sessions and migrates."""
