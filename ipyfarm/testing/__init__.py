"""Tools for testing and benchmarking ipyfarm (not needed to use it)."""
