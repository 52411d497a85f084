"""The lab: a fleet of real OpenSSH hosts on this one machine, for tests, the demo and benchmarks.

    layout.py      names, addresses and config files of a fleet (pure)
    keys.py        ed25519 keys in OpenSSH format (no ssh-keygen per host)
    procs.py       processes by PID: spawn, start-time check, kill and reap
    machine.py     the few machine-wide things fleets share (lock, /run/netns, /srv/app)
    state.py       DIR/fleet.json: everything a fleet created, so `down` removes exactly that
    fleet.py       Fleet.up / Fleet.load / .down / .ssh / .fault (the API tests use)
    faults.py      down/up, kill/restart, hang/resume, disk_full/disk_ok, slow/fast
    delayproxy.py  a TCP proxy that adds latency (this kernel has no netem)
    sshagent.py    an ssh-agent of our own (by PID), for agent and passphrase-key tests

docs/fleet.md says how to use it and what it measured.
"""
