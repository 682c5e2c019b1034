"""Command-line entry points: ``ssh-worker`` (worker hosts) and ``buildbot-sshmux`` (masters)."""
