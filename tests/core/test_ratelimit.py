"""Fixed-window rate limits, on the local-memory cache and on Redis (one round trip per hit there)."""

import uuid

import pytest
import redis as redis_lib
from django.core.cache import cache

from oauthproxy.core import ratelimit
from oauthproxy.core.exceptions import RateLimited
from oauthproxy.core.ratelimit import rate_limit_hit

REDIS_URL = "redis://127.0.0.1:6379/0"
START = 1_800_000_000 - (1_800_000_000 % 60)  # the first second of a minute


def _redis_available() -> bool:
    try:
        return redis_lib.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5).ping()
    except redis_lib.RedisError:
        return False


@pytest.fixture(params=["locmem", "redis"])
def backend(request, settings):
    """Each test runs on both cache backends; Redis with a key prefix of its own, removed afterwards."""
    if request.param == "redis":
        if not _redis_available():
            pytest.skip(f"no Redis at {REDIS_URL}")
        prefix = f"test-ratelimit-{uuid.uuid4().hex}"
        settings.CACHES = {
            "default": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": REDIS_URL, "KEY_PREFIX": prefix}
        }
        yield request.param
        cache.delete_pattern("*")  # django-redis: only this prefix's keys
    else:
        cache.clear()
        yield request.param
        cache.clear()


@pytest.fixture
def clock(monkeypatch):
    class Clock:
        now = float(START)

        def __call__(self):
            return self.now

    fake = Clock()
    monkeypatch.setattr(ratelimit.time, "time", fake)
    return fake


def hits(name: str, key: str, n: int) -> int:
    """How many of *n* hits pass before the first refusal."""
    for passed in range(n):
        try:
            rate_limit_hit(name=name, key=key)
        except RateLimited:
            return passed
    return n


def test_the_budget_of_a_window_then_429_until_the_window_ends(backend, clock, settings):
    settings.OAUTHPROXY = {**settings.OAUTHPROXY, "RATE_LIMITS": {"register:ip": (3, 60)}}
    clock.now = START + 15
    assert hits("register:ip", "crm:192.0.2.1", 3) == 3
    with pytest.raises(RateLimited) as info:
        rate_limit_hit(name="register:ip", key="crm:192.0.2.1")
    assert info.value.status == 429
    assert info.value.retry_after == 45  # until the next window
    clock.now = START + 59
    with pytest.raises(RateLimited) as info:
        rate_limit_hit(name="register:ip", key="crm:192.0.2.1")
    assert info.value.retry_after == 1


def test_a_new_window_starts_a_new_budget(backend, clock, settings):
    settings.OAUTHPROXY = {**settings.OAUTHPROXY, "RATE_LIMITS": {"token:client": (2, 60)}}
    assert hits("token:client", "crm:abc", 5) == 2
    clock.now = START + 60
    assert hits("token:client", "crm:abc", 5) == 2
    clock.now = START + 150  # two windows later
    assert hits("token:client", "crm:abc", 5) == 2


def test_keys_and_limits_are_counted_apart(backend, clock, settings):
    settings.OAUTHPROXY = {**settings.OAUTHPROXY, "RATE_LIMITS": {"token:client": (1, 60), "token:ip": (1, 60)}}
    assert hits("token:client", "crm:abc", 2) == 1
    assert hits("token:client", "crm:other", 2) == 1
    assert hits("token:client", "billing:abc", 2) == 1
    assert hits("token:ip", "crm:abc", 2) == 1


def test_client_supplied_keys_of_any_shape(backend, clock, settings):
    settings.OAUTHPROXY = {**settings.OAUTHPROXY, "RATE_LIMITS": {"authorize:client": (1, 60)}}
    for key in ("crm:" + "x" * 5000, "crm:with spaces\nand\x00controls", "crm:\ud800", "crm:https://a.example/c"):
        assert hits("authorize:client", key, 2) == 1


def test_a_zero_limit_counts_nothing(backend, clock, settings):
    settings.OAUTHPROXY = {**settings.OAUTHPROXY, "RATE_LIMITS": {"register:ip": (0, 60)}}
    assert hits("register:ip", "crm:192.0.2.1", 100) == 100


def test_redis_counters_expire_with_their_window(backend, clock, settings):
    if backend != "redis":
        pytest.skip("Redis only")
    settings.OAUTHPROXY = {**settings.OAUTHPROXY, "RATE_LIMITS": {"register:ip": (10, 60)}}
    hits("register:ip", "crm:192.0.2.1", 3)
    client = cache.client.get_client(write=True)
    [key] = client.keys(cache.make_key("rl:*"))
    assert int(client.get(key)) == 3
    assert 0 < client.ttl(key) <= 61


def test_the_benchmark_settings_raise_every_limit():
    """The benchmarks hammer one client from one address: a limit they leave in place is measured as the
    limiter's 429s (S2 once counted hundreds of refused refreshes as a proxy's answers)."""
    import ast
    from pathlib import Path

    source = (Path(__file__).resolve().parents[2] / "bench" / "settings_bench.py").read_text()
    raised = {
        key.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Dict)
        for key in node.keys
        if isinstance(key, ast.Constant) and isinstance(key.value, str) and ":" in key.value
    }
    assert raised == set(ratelimit.DEFAULT_LIMITS)
