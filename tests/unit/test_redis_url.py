"""`--redis-url`: one Redis, Redis Cluster, Sentinel; bad URLs are refused at start-up."""

from __future__ import annotations

import pytest

from extauthz.backends.redis_url import RedisKind, parse_redis_url, redacted
from extauthz.settings import SettingsError, load_settings


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("localhost:6379", "SCHEME://"),
        ("http://h:1", "unknown scheme"),
        ("redis://", "no host"),
        ("redis+cluster://", "no host:port"),
        ("redis+cluster://h", "not host:port"),
        ("redis+cluster://h:0", "not host:port"),
        ("redis+cluster://h:99999", "not host:port"),
        ("redis+cluster://h:7000/1", "only database 0"),
        ("redis+cluster://h:7000?ssl=true", "no query"),
        ("redis+sentinel://h:26379", "service_name"),
        ("redis+sentinel://h:26379/", "service_name"),
        ("redis+sentinel://h:26379/svc/x", "database must be a number"),
        ("redis+sentinel://h:26379/svc/0/extra", "service_name"),
        ("rediss+cluster://h:7000", "unknown scheme"),
    ],
)
def test_bad_urls_are_refused_with_the_reason(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_redis_url(url)


def test_single_redis_urls_are_left_to_redis_py() -> None:
    for url in ("redis://127.0.0.1:6379/0", "rediss://h:6380/2", "unix:///run/redis.sock?db=1"):
        target = parse_redis_url(url)
        assert target.kind is RedisKind.SINGLE and target.url == url


def test_cluster_url_lists_start_up_nodes_including_ipv6() -> None:
    t = parse_redis_url("redis+cluster://a:7000,b.example:7001,[::1]:7002")
    assert t.kind is RedisKind.CLUSTER
    assert t.nodes == (("a", 7000), ("b.example", 7001), ("::1", 7002))
    assert t.password is None and t.db == 0


def test_sentinel_url_names_service_db_and_credentials() -> None:
    t = parse_redis_url("redis+sentinel://app:p%40ss@s1:26379,s2:26380/limits/3")
    assert t.kind is RedisKind.SENTINEL
    assert t.nodes == (("s1", 26379), ("s2", 26380))
    assert (t.service, t.db, t.username, t.password) == ("limits", 3, "app", "p@ss")


def test_password_never_appears_in_repr_or_errors() -> None:
    t = parse_redis_url("redis+sentinel://app:hunter2@s1:26379/limits")
    assert "hunter2" not in repr(t)
    assert redacted("redis://:hunter2@h:6379/0") == "redis://:***@h:6379/0"
    with pytest.raises(ValueError) as info:
        parse_redis_url("redis+cluster://u:hunter2@h:7000/5")
    assert "hunter2" not in str(info.value)


def test_settings_refuse_a_bad_url_only_when_redis_is_the_backend() -> None:
    load_settings({"redis_url": "nonsense"}, {})  # memory backend: the URL is not used
    with pytest.raises(SettingsError, match="redis_url"):
        load_settings({"rate_limit_backend": "redis", "redis_url": "redis+sentinel://h:1"}, {})
    s = load_settings({"rate_limit_backend": "redis", "redis_url": "redis+cluster://h:7000"}, {})
    assert s.redis_url == "redis+cluster://h:7000" and s.redis_timeout == 0.15
