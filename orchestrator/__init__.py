"""Ferry's orchestrator: plans, change authorization, CMS records, transports, flows, CLI."""

__version__ = "0.1.0"
