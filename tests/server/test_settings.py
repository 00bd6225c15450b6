"""Server settings: defaults, SSOLE_SERVER_* environment variables and flags, in that order."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.__main__ import main
from server.settings import ServerSettings, settings_from_args


def test_flags_override_environment_which_overrides_defaults(monkeypatch):
    monkeypatch.setenv("SSOLE_SERVER_MODEL", "local-dir:/models/from-env")
    monkeypatch.setenv("SSOLE_SERVER_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("SSOLE_SERVER_API_KEY", "s3cret-value")
    s = settings_from_args(["--max-batch-size", "48", "--no-warmup"])
    assert s.model == "local-dir:/models/from-env"
    assert s.max_batch_size == 48
    assert s.warmup is False
    assert s.api_key is not None and s.api_key.get_secret_value() == "s3cret-value"
    assert "s3cret-value" not in repr(s)  # the key never shows up in logs
    assert s.max_queue == ServerSettings.model_fields["max_queue"].default


@pytest.mark.parametrize(
    ("model", "served", "expected"),
    [
        ("local-dir:/models/ssole-r50/", None, "ssole-r50"),
        ("hf-hub:org/ssole_resnet50.in1k_m8", None, "org/ssole_resnet50.in1k_m8"),
        ("ssole_resnet18.in100_m4", None, "ssole_resnet18.in100_m4"),
        ("local-dir:/models/x", "my-model", "my-model"),
    ],
)
def test_model_id_is_the_name_clients_use(model, served, expected):
    assert ServerSettings(model=model, served_model_name=served).model_id == expected


def test_backend_comes_from_the_environment_or_the_flag(monkeypatch):
    assert ServerSettings(model="m").backend == "auto"
    monkeypatch.setenv("SSOLE_SERVER_BACKEND", "onnx")
    assert settings_from_args(["--model", "m"]).backend == "onnx"
    assert settings_from_args(["--model", "m", "--backend", "onnx-int8"]).backend == "onnx-int8"


def test_empty_api_key_means_no_key(monkeypatch):
    monkeypatch.setenv("SSOLE_SERVER_API_KEY", "")
    assert ServerSettings(model="m").api_key is None


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_wait_ms": -1}, "max_batch_wait_ms"),
        ({"dtype": "int8"}, "dtype"),
        ({"backend": "openvino"}, "backend"),
        ({"max_items": 100, "max_queue": 10}, "max_items"),
        ({"port": 70000}, "port"),
    ],
)
def test_invalid_settings_name_the_field(overrides, field):
    with pytest.raises(ValidationError, match=field):
        ServerSettings(model="m", **overrides)


def test_cli_without_a_model_exits_2_with_a_clear_message(monkeypatch, capsys):
    monkeypatch.delenv("SSOLE_SERVER_MODEL", raising=False)
    assert main([]) == 2
    assert "model" in capsys.readouterr().err
