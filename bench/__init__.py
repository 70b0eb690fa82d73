"""End-to-end speed benchmarks (``python -m bench.speed``) and the comparison with libcpab
(``python -m bench.against_libcpab``)."""
