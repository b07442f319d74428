"""One rule for names that come from data, and credentials masked wherever text goes."""

from __future__ import annotations

import logging
import re
import unicodedata

import pytest
from mlflow.utils.validation import _validate_metric_name, _validate_param_name

from transferlab.names import UnsafeName, data_name, data_path, metric_key
from transferlab.redact import RedactingFilter, redact, url_credentials


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("..", "leave its folder"),
        (".", "leave its folder"),
        ("", "empty"),
        ("  ", "empty"),
        ("a/b", "'/'"),
        ("a\\b", "'/'"),
        ("a\x00b", "control character U+0000"),
        ("new\nline", "control character U+000A"),
        ("bad\udcffbyte", "undecodable byte"),
        ("exe\u202egpj.jpg", "control character U+202E"),
        (" padded", "blanks"),
        ("é" * 200, "255 bytes"),
    ],
)
def test_data_name_refuses_what_some_sink_would_not_take(raw, reason):
    with pytest.raises(UnsafeName, match=re.escape(reason)):
        data_name(raw)


def test_data_name_keeps_real_labels_and_normalises_to_nfc():
    for label in ("cat's 🐱", "A&B (1)", "Ankle boot", "$(touch PWNED)", "日本", "x" * 255):
        assert data_name(label) == label
    nfd = unicodedata.normalize("NFD", "café")
    assert nfd != "café" and data_name(nfd) == "café"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("/abs/path/evil.png", "absolute"),
        ("a//b.png", "empty path segment"),
        ("a/b/", "empty path segment"),
        ("a/../../etc/x.png", "'..'"),
        ("", "empty path"),
    ],
)
def test_data_path_never_leaves_its_folder(raw, reason):
    with pytest.raises(UnsafeName, match=re.escape(reason)):
        data_path(raw)


def test_data_path_keeps_nested_names():
    assert data_path("cats/2024/x.png").parts == ("cats", "2024", "x.png")


def test_metric_keys_are_valid_for_mlflow_and_keep_labels_apart():
    labels = ["cat's 🐱", "cat&s 🐱", "A&B (1)", "A_B _1_", "café", "a..b", "x" * 300, "ok"]
    keys = [metric_key(f"test_acc_class_{label}") for label in labels]
    assert len(set(keys)) == len(keys)
    for key in keys:
        _validate_metric_name(key)  # raises MlflowException on a bad name
        _validate_param_name(key)
    assert metric_key("test_acc_class_ok") == "test_acc_class_ok"  # plain names unchanged
    assert metric_key("test_acc_class_café") == "test_acc_class_café"


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("error for s3://b/p at http://user:pass@host:9000/", "user:pass"),
        ("postgresql://me:hunter2@db/mlflow", "hunter2"),
        ("https://h/a.tgz?X-Amz-Signature=abc123&x=1", "abc123"),
        ("https://h/a.tgz?token=s3cr3t", "s3cr3t"),
    ],
)
def test_redact_masks_credentials(text, secret):
    assert secret not in redact(text)
    assert "***" in redact(text)


def test_url_credentials_names_what_it_found():
    assert url_credentials("http://user:pass@host/") == "a user name or password"
    assert url_credentials("http://key@host/") == "a user name or password"
    assert "token" in url_credentials("https://h/a.tgz?token=x")
    assert url_credentials("https://h/a.tgz?version=2") is None
    assert url_credentials("s3://bucket/prefix") is None


def test_log_records_are_redacted():
    record = logging.LogRecord(
        "x", logging.ERROR, "f", 1, "cannot reach %s", ("http://u:pw@h/",), None
    )
    RedactingFilter().filter(record)
    assert "pw" not in record.getMessage() and "***@h" in record.getMessage()
