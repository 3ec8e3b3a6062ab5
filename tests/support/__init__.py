"""Helpers shared by the tests: real servers that misbehave on purpose (`misbehaving` on raw
sockets, `backends` over HTTP), waiting for a condition with a deadline, a fake clock, config
files edited while a system runs, and log records."""
