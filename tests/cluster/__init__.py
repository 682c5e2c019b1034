"""A cluster of real Buildbot masters: Buildbot's multi-master mode.

Real parts only: a private PostgreSQL server (`pg`), a crossbar WAMP router
(`router`) and N Buildbot masters run as ``twistd`` subprocesses sharing them,
each with `SSHMuxService` on its own SSH port (`masters`); pytest fixtures in
``conftest.py``.  Run with ``tox -e cluster`` (SSHMUX_CLUSTER=1).
"""
