"""The container health check: GET /readyz on this container, with the public host name as Host.

With a strict ALLOWED_HOSTS (the production default: the host of PUBLIC_BASE_URL) a request for
127.0.0.1 would be refused with 400, so the check asks for the public host, as the load balancer does.
Exit status 0 when the app answers 200 (it can reach its database), 1 otherwise.
"""

import os
import sys
import urllib.error
import urllib.request
from urllib.parse import urlsplit


def main() -> int:
    host = urlsplit(os.environ.get("PUBLIC_BASE_URL", "")).netloc or "localhost"
    request = urllib.request.Request(
        f"http://127.0.0.1:{os.environ.get('PORT', '8000')}/readyz", headers={"Host": host}
    )
    try:
        with urllib.request.urlopen(request, timeout=3) as response:  # noqa: S310 (fixed loopback URL)
            return 0 if response.status == 200 else 1
    except (OSError, urllib.error.URLError) as exc:
        print(f"not ready: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
