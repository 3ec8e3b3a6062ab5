"""Helpers shared by the tests: real servers that misbehave on purpose."""
