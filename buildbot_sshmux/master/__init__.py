"""The master's side: `SSHMuxService`, the SSH server and its policy,
authorization per host, authorized_hosts, limits.  Needs buildbot, never
buildbot_worker nor `buildbot_sshmux.worker`."""
