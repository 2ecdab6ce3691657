"""
Benchmark harness of the S3 sinks: ``python -m benchmarks`` (or ``make bench``).

It starts its own moto S3 server and measures, from one run and side by side, the original model runner's
``S3Sink`` ("seed"), a bare aiobotocore upload of pre-serialised bytes ("floor"), :class:`AsyncS3Sink` and the
:class:`S3Sink` facade, on a single large write, many small concurrent writes and streamed collections. Every
measurement runs in a fresh subprocess so that peak RSS growth belongs to that measurement alone.
"""
