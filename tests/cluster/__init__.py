"""A cluster of real Buildbot masters: Buildbot's multi-master mode.

Real parts only: a private PostgreSQL server, a crossbar WAMP router and N
Buildbot masters run as ``twistd`` subprocesses sharing them, each with
`SSHMuxService` on its own SSH port.  The machinery is the cluster demo's,
``buildbot_sshmux/demo/cluster/`` (`pg`, `router`, `masters`, `cluster`,
`timers`, `parts`); the pytest fixtures are in ``conftest.py``.  Run with
``tox -e cluster`` (SSHMUX_CLUSTER=1).
"""
