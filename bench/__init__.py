"""End-to-end speed benchmarks (``python -m bench.speed``)."""
