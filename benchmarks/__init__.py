"""Benchmarks of buildbot-sshmux against plain PB/TCP and an OpenSSH tunnel (``tox -e bench``)."""
