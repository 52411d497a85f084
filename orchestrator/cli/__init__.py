"""Ferry's command line (typer). `main.py` wires the groups and maps errors to exit codes."""
