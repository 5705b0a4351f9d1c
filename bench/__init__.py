"""Benchmarks run against a real daemon; each prints figures and asserts no timing."""
