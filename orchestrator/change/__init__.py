"""Change authorization: change models, RFC lifecycle, approvals, calendar, and the gate.

`gate.require(...)` is what build check-in and deployments call; it loads the RFC, asks the
pure `authorize(...)` and records the decision in the audit log.
"""
