"""A logging filter that keeps tokens and secrets out of log lines (DESIGN §5.2).

Logging calls in this project never pass tokens; this filter is the second line of defence for
third-party libraries that log request bodies or URLs (oauthlib, urllib3).
"""

import logging
import re

_PATTERNS = [
    # key=value in query strings and form bodies
    re.compile(
        r"(?i)\b(access_token|refresh_token|id_token|code|code_verifier|client_secret|password|state|"
        r"registration_access_token|token)=([^&\s\"']+)"
    ),
    # "key": "value" in JSON
    re.compile(
        r"(?i)\"(access_token|refresh_token|id_token|code|code_verifier|client_secret|password|"
        r"registration_access_token|token)\"\s*:\s*\"([^\"]*)\""
    ),
    # Authorization headers
    re.compile(r"(?i)\b(Bearer|Basic)\s+([A-Za-z0-9\-._~+/=]{8,})"),
]


def redact(text: str) -> str:
    text = _PATTERNS[0].sub(lambda m: f"{m.group(1)}=[redacted]", text)
    text = _PATTERNS[1].sub(lambda m: f"\"{m.group(1)}\": \"[redacted]\"", text)
    return _PATTERNS[2].sub(lambda m: f"{m.group(1)} [redacted]", text)


class RedactSecretsFilter(logging.Filter):
    """Rewrites a record whose message holds a secret. Attached to the handlers and to uvicorn's loggers
    (whose access log line carries the request's query string)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned == message:
            return True
        if isinstance(record.args, tuple):
            # Keep the record's shape (uvicorn's access formatter unpacks its arguments): redact each one.
            args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
            try:
                if redact(record.msg % args) == record.msg % args:
                    record.args = args
                    return True
            except (TypeError, ValueError):
                pass
        record.msg, record.args = cleaned, None
        return True
