"""On-call runbooks: status, manual backout, crash recovery, drift audit."""
