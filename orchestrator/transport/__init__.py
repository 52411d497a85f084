"""Transports: how Ferry reaches hosts. `ssh.py` pushes over SSH (paramiko, strict host keys)."""
