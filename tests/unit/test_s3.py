"""deployer.s3 without S3: the one client's settings and what each botocore error means."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from deployer import s3
from deployer.config import S3Config


def client_error(code: str, status: int, message: str = "boom") -> ClientError:
    response = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "ListObjectsV2")


@pytest.mark.parametrize(
    ("exc", "kind", "code"),
    [
        (NoCredentialsError(), "no_credentials", ""),
        (client_error("NoSuchBucket", 404), "no_bucket", "NoSuchBucket"),
        (client_error("AccessDenied", 403), "denied", "AccessDenied"),
        (client_error("SignatureDoesNotMatch", 403), "denied", "SignatureDoesNotMatch"),
        (client_error("NoSuchKey", 404), "not_found", "NoSuchKey"),
        (client_error("404", 404, ""), "not_found", "404"),
        (client_error("SlowDown", 503), "refused", "SlowDown"),
        (EndpointConnectionError(endpoint_url="http://10.0.0.1:1/b"), "unreachable", ""),
    ],
)
def test_classify(exc: Exception, kind: str, code: str) -> None:
    failure = s3.classify(exc)
    assert failure is not None and (failure.kind, failure.code) == (kind, code)


def test_other_exceptions_are_not_s3_failures() -> None:
    assert s3.classify(RuntimeError("bug")) is None
    assert s3.error_text(RuntimeError("")) == "RuntimeError"


def test_error_text_is_one_safe_line() -> None:
    assert s3.error_text(client_error("AccessDenied", 403, "no")) == "AccessDenied: no"
    assert s3.error_text(client_error("404", 404, "")) == "404: S3 error"
    leaky = RuntimeError("key AKIAABCDEFGHIJKLMNOP\nrejected " + "x" * 300)
    text = s3.error_text(leaky)
    assert "AKIAABCDEFGHIJKLMNOP" not in text and "\n" not in text and len(text) == 200


def test_one_client_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    client = s3.client_for(S3Config(endpoint_url="http://10.0.0.1:9000", region="eu-west-1"))
    config = client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (5, 15)
    assert config.retries == {"total_max_attempts": 2, "mode": "standard"}
    assert client.meta.endpoint_url == "http://10.0.0.1:9000"
    assert client.meta.region_name == "eu-west-1"
    session, other = s3.session_and_client(S3Config())
    assert other.meta.config.read_timeout == 15 and session.get_credentials() is not None
