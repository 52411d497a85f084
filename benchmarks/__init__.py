"""Ferry's benchmarks against Ansible, pyinfra and raw OpenSSH on one lab fleet (issue 7).

Not part of the test suite. `make bench` (= `.venv/bin/python -m benchmarks.run`) brings up
a fleet, runs every scenario for every tool in the same run and writes
benchmarks/results.md and benchmarks/results.png; docs/benchmarks.md explains the method.
"""
