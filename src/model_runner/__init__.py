"""model-runner-sink: write GeoJSON detection results to Amazon S3."""
