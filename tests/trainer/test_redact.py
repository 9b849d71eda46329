"""Credentials in URLs never reach MLflow params or messages: user-info and query strings are redacted."""

from trainer.config import load_config
from trainer.tracking import redact, safe_params


def test_url_user_info_and_query_strings_are_redacted():
    text = "reading https://u:pw@host/a.tar?X-Amz-Signature=abc123&X-Amz-Credential=key and s3://b/c.tar"
    out = redact(text, [])
    assert "pw" not in out and "abc123" not in out and "key" not in out
    assert "https://***@host/a.tar?***" in out and "s3://b/c.tar" in out


def test_a_token_in_a_shard_url_is_not_a_param():
    url = "https://data.example/shards/{000000..000003}.tar?token=s3cr3t-t0ken"
    cfg = load_config("debug", [f"data.pair.urls={url}", "data.text.urls=/d/t", "data.image.urls=/d/i"])
    params = safe_params(cfg)
    assert not any("s3cr3t" in v for v in params.values())
    assert params["data.pair.urls"] == "https://data.example/shards/{000000..000003}.tar?***"
