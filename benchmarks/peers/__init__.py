"""
The peers report: ``python -m benchmarks.peers`` (or ``make bench-report``).

This project's sinks, the seed and the floor, beside what a user would pick instead (aioboto3, obstore, smart_open
and s3fs), on the harness's single and concurrent workloads; a table, ``benchmarks/results/report.json`` and
``benchmarks/results/report.png``.
"""
