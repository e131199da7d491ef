"""Contract suites: one set of tests that every implementation of a port must pass."""
