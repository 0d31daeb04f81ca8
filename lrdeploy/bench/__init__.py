"""Reports (and, later, latency measurement): the dataclass tree of a build and its renderings."""
