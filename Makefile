# The README's two commands. Each sets up what it needs (.ci/bootstrap) first.
.PHONY: demo test lint bootstrap bench

bootstrap:
	@bash .ci/bootstrap

demo: bootstrap
	@.venv/bin/python -m orchestrator.demo

test: bootstrap
	.venv/bin/ruff check orchestrator dml remediation tests
	.venv/bin/pytest -q

lint: bootstrap
	.venv/bin/ruff check orchestrator dml remediation tests benchmarks
	.venv/bin/ruff format --check orchestrator dml remediation tests

bench: bootstrap
	.venv/bin/python -m benchmarks.run
