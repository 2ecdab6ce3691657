"""
Benchmarks of the S3 sinks: ``python -m benchmarks`` (``make bench``) and ``python -m benchmarks --peers``
(``make bench-report``). How they measure: ``benchmarks/README.md``.
"""
