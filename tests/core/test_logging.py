import logging

from oauthproxy.core.logging import RedactSecretsFilter, redact


def test_form_and_query_values_are_redacted():
    line = "POST body grant_type=refresh_token&refresh_token=abc.DEF-123&client_secret=s3cr3t&scope=x"
    cleaned = redact(line)
    assert "abc.DEF-123" not in cleaned and "s3cr3t" not in cleaned
    assert "grant_type=refresh_token" in cleaned and "scope=x" in cleaned


def test_json_values_and_authorization_headers_are_redacted():
    cleaned = redact('{"access_token": "tok-value-1", "expires_in": 3600} Authorization: Bearer eyJhbGciOi.xyz')
    assert "tok-value-1" not in cleaned and "eyJhbGciOi.xyz" not in cleaned
    assert '"expires_in": 3600' in cleaned


def test_filter_rewrites_records_from_third_party_loggers(caplog):
    logger = logging.getLogger("oauthlib.test")
    logger.addFilter(RedactSecretsFilter())
    try:
        with caplog.at_level(logging.WARNING, logger="oauthlib.test"):
            logger.warning("Validating code=%s for client", "raw-code-value")
    finally:
        logger.filters.clear()
    assert "raw-code-value" not in caplog.text
    assert "code=[redacted]" in caplog.text


def test_uvicorn_access_log_is_redacted_and_keeps_its_shape(caplog):
    # issue 13 finding 7: uvicorn's access logger does not propagate; the settings give it the filter
    logger = logging.getLogger("uvicorn.access")
    assert any(isinstance(f, RedactSecretsFilter) for f in logger.filters)
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/oauth/crm/callback?code=raw-upstream-code&state=raw-state-value", "1.1", 302),
        None,
    )
    assert RedactSecretsFilter().filter(record)
    assert len(record.args) == 5  # uvicorn's AccessFormatter unpacks five arguments
    line = record.getMessage()
    assert "raw-upstream-code" not in line and "raw-state-value" not in line
    assert "/oauth/crm/callback?code=[redacted]&state=[redacted]" in line
