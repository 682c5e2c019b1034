"""A cluster of real Buildbot masters: Buildbot's multi-master mode, on 127.0.0.1.

Real parts only: a private PostgreSQL server (`pg`), a crossbar WAMP router
(`router`) and N Buildbot masters run as ``twistd`` subprocesses sharing them,
each with `SSHMuxService` on its own SSH port (`masters`), put together by
`cluster.Cluster`; stock buildbot-worker processes over plain PB, for
comparison (`stock`); the shortened expiry and heartbeat timers (`timers`); where
PostgreSQL and crossbar are, and ``.ci/install-cluster`` that installs them
(`parts`).  Blocking, no reactor (`procs`).  ``buildbot-sshmux demo
--cluster`` (`buildbot_sshmux.demo.cluster_run`) and the cluster tests
(``tests/cluster/``, ``tox -e cluster``) use it.  Needs the ``master`` and
``worker`` extras, ``psycopg2-binary`` and ``buildbot-www``.
"""
