"""The sync facade encodes its writes in one worker thread at a time."""

from __future__ import annotations

import threading
import time
from typing import Any

from model_runner.cli.synthetic import synthetic_detections
from model_runner.sink import S3Sink


class _Watched:
    """A property value that orjson reaches through ``__geo_interface__``, in the encoder's thread, and that counts
    the threads encoding at that moment."""

    lock = threading.Lock()
    encoding = 0
    peak = 0

    @property
    def __geo_interface__(self) -> dict[str, Any]:
        cls = type(self)
        with cls.lock:
            cls.encoding += 1
            cls.peak = max(cls.peak, cls.encoding)
        time.sleep(0.0005)  # releases the GIL: another encoder thread, if there is one, runs meanwhile
        with cls.lock:
            cls.encoding -= 1
        return {"seen": True}


def test_concurrent_facade_writes_encode_in_one_worker_thread_at_a_time(bucket: str, s3: Any) -> None:
    sink = S3Sink(bucket, "threads")
    sink.validate_s3_bucket()
    collections = {
        f"image-{index}": [{**f, "properties": {"watched": _Watched()}} for f in synthetic_detections(300, seed=index)]
        for index in range(3)
    }
    errors: list[BaseException] = []

    def write(image_id: str) -> None:
        try:
            assert sink.write(image_id, collections[image_id])
        except BaseException as error:  # reported by the test's own thread
            errors.append(error)

    threads = [threading.Thread(target=write, args=(image_id,)) for image_id in collections]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert _Watched.peak == 1
    stored = s3.list_objects_v2(Bucket=bucket, Prefix="threads/")["KeyCount"]
    assert stored == len(collections)
