"""A process that used a sink exits by itself, promptly and cleanly, without closing anything."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import orjson
import pytest

pytestmark = pytest.mark.timeout(60)

EXIT_SECONDS = 20

PREAMBLE = """
import sys
from model_runner.cli.synthetic import synthetic_detections
bucket = sys.argv[1]
features = list(synthetic_detections(2000, seed=7))
"""

SCRIPTS = {
    "main-thread": """
        from model_runner.sink.s3_sink import S3Sink
        sink = S3Sink(bucket, "exit")
        assert sink.validate_s3_bucket()
        assert sink.write("scene", features)
        print("stored")
    """,
    "non-main-thread": """
        import threading
        from model_runner.sink.s3_sink import S3Sink
        results = []
        def work():
            results.append(S3Sink(bucket, "exit").write("scene", features))
        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
        assert results == [True]
        print("stored")
    """,
    "non-main-threads-not-joined": """
        import threading
        from model_runner.sink.s3_sink import S3Sink
        sink = S3Sink(bucket, "exit")
        threads = [threading.Thread(target=sink.write, args=(f"t{i}", features[:10])) for i in range(4)]
        for thread in threads:
            thread.start()
        assert sink.write("scene", features)
        print("stored")
    """,
    "inside-asyncio-run": """
        import asyncio
        from model_runner.sink.s3_sink import S3Sink
        async def main():
            assert S3Sink(bucket, "exit").write("scene", features)
        asyncio.run(main())
        print("stored")
    """,
    "async-sink-not-closed": """
        import asyncio
        from model_runner.sink.async_s3_sink import AsyncS3Sink
        async def main():
            sink = AsyncS3Sink(bucket, "exit")
            assert await sink.write("scene", features)
        asyncio.run(main())
        print("stored")
    """,
    "missing-bucket": """
        from model_runner.sink.s3_sink import S3Sink
        assert S3Sink(bucket + "-missing", "exit").write("other", features) is False
        assert S3Sink(bucket, "exit").write("scene", features)
        print("stored")
    """,
}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_process_exits_by_itself(
    name: str,
    bucket: str,
    s3: Any,
    subprocess_environment: dict[str, str],
) -> None:
    script = PREAMBLE + textwrap.dedent(SCRIPTS[name])
    completed = subprocess.run(
        [sys.executable, "-W", "always::ResourceWarning", "-c", script, bucket],
        env=subprocess_environment,
        capture_output=True,
        text=True,
        timeout=EXIT_SECONDS,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == "stored\n"
    for marker in ("Unclosed", "unclosed", "ResourceWarning", "Exception ignored", "Traceback"):
        assert marker not in completed.stderr, completed.stderr
    stored = orjson.loads(s3.get_object(Bucket=bucket, Key="exit/scene.geojson")["Body"].read())
    assert len(stored["features"]) == 2000
