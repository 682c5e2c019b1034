"""What both ends share: the SSH transport (AEAD ciphers, strict key
exchange), a channel that is a transport, keepalives and rekeying, key files,
and log lines about peers.  Imports neither buildbot nor buildbot_worker."""
