"""Reading botocore's answers and errors: the error code and the retries, in one place."""

from __future__ import annotations

from botocore.exceptions import ClientError

from model_runner.sink.metrics import error_type
from model_runner.sink.responses import error_code, retry_attempts


def refused(code: str | None, retries: int = 0) -> ClientError:
    error: dict[str, str] = {"Message": "refused"} if code is None else {"Code": code, "Message": "refused"}
    return ClientError({"Error": error, "ResponseMetadata": {"RetryAttempts": retries}}, "PutObject")  # type: ignore[arg-type]


def test_the_error_code_is_s3s_for_a_client_error_and_none_otherwise() -> None:
    assert error_code(refused("NoSuchUpload")) == "NoSuchUpload"
    assert error_code(refused(None)) is None
    assert error_code(ValueError("NoSuchUpload")) is None


def test_the_retries_are_read_from_an_answer_or_an_error() -> None:
    assert retry_attempts({"ResponseMetadata": {"RetryAttempts": 3}}) == 3
    assert retry_attempts({}) == 0
    assert retry_attempts(refused("SlowDown", retries=2).response) == 2


def test_a_failure_is_labelled_by_its_code_else_its_class() -> None:
    assert error_type(refused("SlowDown")) == "SlowDown"
    assert error_type(refused(None)) == "ClientError"
    assert error_type(TimeoutError()) == "TimeoutError"
