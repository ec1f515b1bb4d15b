"""Production settings for the benchmarks: identical to ``proxy_site.settings.production`` except:

- the open endpoints' rate limits and the per-client upstream quotas are raised out of the way (both are
  still counted in Redis on every request, so their cost is measured): a benchmark doing 300 registrations
  a second from one loopback address, or hundreds of upstream refreshes a minute for one client, would
  otherwise measure the limiter's refusals;
- the cache key prefix is per deployment (``BENCH_CACHE_PREFIX``), so runs sharing the machine's Redis never
  see each other's counters (client primary keys restart at 1 in every fresh database).
"""

import os

from proxy_site.settings.production import *  # noqa: F401,F403

OAUTHPROXY = {  # noqa: F405
    **OAUTHPROXY,  # noqa: F405
    "RATE_LIMITS": {  # every limit of oauthproxy.core.ratelimit.DEFAULT_LIMITS (tests/core/test_ratelimit.py)
        "register:ip": (10**9, 60),
        "authorize:source": (10**9, 60),
        "authorize:client": (10**9, 60),
        "token:source": (10**9, 60),
        "token:client": (10**9, 60),
        "token:ip": (10**9, 60),
        "introspect:credential": (10**9, 60),
    },
    "CLIENT_UPSTREAM_PER_MINUTE": 10**9,
    "CLIENT_UPSTREAM_PER_DAY": 10**9,
}

if os.environ.get("BENCH_CACHE_PREFIX") and "KEY_PREFIX" in CACHES["default"]:  # noqa: F405
    CACHES["default"]["KEY_PREFIX"] = os.environ["BENCH_CACHE_PREFIX"]  # noqa: F405
