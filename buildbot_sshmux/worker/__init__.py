"""The worker host's side: the shared link to each master, isolated worker
sessions, the launcher and its config.  Needs buildbot-worker, never buildbot
nor `buildbot_sshmux.master`."""
