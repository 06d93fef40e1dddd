"""Reference models used by tests, benchmarks and the demo."""
