"""Benchmarks: scripts run by hand (or on a GPU machine) that print and write measured figures."""
