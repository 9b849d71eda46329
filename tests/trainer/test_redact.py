"""Credentials in URLs never reach MLflow params or messages: user-info and query strings are redacted."""

from trainer.config import load_config
from trainer.redaction import redact, safe_params


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


def test_one_list_of_secret_words_serves_config_keys_env_scrubbing_and_job_env():
    """The MLflow params, the log scrubbing and `unimo submit`'s env check read the same words (they once had
    three lists that differed: PASSWD and PRIVATE_KEY were refused by one and logged by another)."""
    import pytest

    from orchestrator.jobs import JobsError, job_env
    from trainer.redaction import SECRET_WORDS, is_secret_env_name, is_secret_key, secret_values

    for word in SECRET_WORDS:
        name = f"MY_{word.upper()}"
        assert is_secret_key(f"tracking.my_{word}") and is_secret_env_name(name)
        assert secret_values({name: "long-enough-value"}) == ["long-enough-value"]
        with pytest.raises(JobsError, match=name):
            job_env({name: "x"}, environ={})
    # ordinary settings that merely contain a word are not secrets as config keys
    assert not is_secret_key("data.tokenizer") and not is_secret_key("model.text.pad_token_id")
    assert secret_values({"AWS_SESSION_TOKEN": "short"}) == []  # too short to scrub without garbling the logs
