"""The demo (`run`) and what it shares with the tests and benchmarks: a real
master, launcher processes and a site of keys on 127.0.0.1 (`harness`)."""
