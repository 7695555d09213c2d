"""A/B routing and model-name parsing: pure functions, no Ray, no vLLM."""

from __future__ import annotations

from collections import Counter

import pytest

from serve.errors import APIError
from serve.routing import adapter_part, bucket, caller_key, choose, route

SPLIT = {"city": {"city@3": 80, "city@4": 20}}


def test_80_20_split_over_500_distinct_users_is_within_5_points():
    picks = Counter(route("city", SPLIT, caller_key(f"user-{i}", None)) for i in range(500))
    assert set(picks) == {"city@3", "city@4"}
    assert abs(picks["city@3"] / 500 - 0.80) <= 0.05, picks


def test_same_user_always_gets_the_same_version():
    for i in range(100):
        key = caller_key(f"user-{i}", None)
        assert len({route("city", SPLIT, key) for _ in range(5)}) == 1


def test_assignment_does_not_depend_on_dict_order_and_splits_are_independent():
    swapped = {"city": {"city@4": 20, "city@3": 80}}
    users = [caller_key(f"u{i}", None) for i in range(200)]
    assert [route("city", SPLIT, u) for u in users] == [route("city", swapped, u) for u in users]
    # a second split salted by its own name does not put the same users in the same arm
    assert [bucket("city", u) < 0.5 for u in users] != [bucket("other", u) < 0.5 for u in users]


def test_caller_key_prefers_user_then_api_key_then_address():
    assert caller_key("ann", "k1", "1.2.3.4") == "user:ann"
    assert caller_key(None, "k1", "1.2.3.4").startswith("key:") and "k1" not in caller_key(None, "k1")
    assert caller_key(None, None, "1.2.3.4") == "addr:1.2.3.4"
    assert caller_key(None, None) == "anonymous"


def test_unsplit_names_route_to_themselves_and_weights_can_be_fractions():
    assert route("beta", SPLIT, "user:x") == "beta"
    picks = Counter(choose("c", {"a": 0.9, "b": 0.1}, f"user:{i}") for i in range(1000))
    assert 850 <= picks["a"] <= 950


def test_adapter_part():
    assert adapter_part("base", "base") is None
    assert adapter_part("base:city", "base") == "city"
    assert adapter_part("city@production", "base") == "city@production"
    with pytest.raises(APIError) as e:
        adapter_part("other-base:city", "base")
    assert e.value.status == 404


def test_a_dead_or_replaced_replica_is_a_503_and_errors_keep_their_status():
    """The ingress's error mapping: Ray's actor and back-pressure errors (a replica that died or is being
    replaced) are 503 (retry), a replica's HTTPException keeps its status through Ray's wrapping, the rest 500."""
    from fastapi import HTTPException
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
    from ray.serve.exceptions import BackPressureError

    from serve.errors import status_and_message

    assert status_and_message(ActorDiedError())[0] == 503
    assert status_and_message(ActorUnavailableError("gone", b"x" * 16))[0] == 503
    assert status_and_message(BackPressureError(num_queued_requests=3, max_queued_requests=2))[0] == 503
    wrapped = RayTaskError("f", "tb", HTTPException(503, "the engine died"))
    assert status_and_message(wrapped) == (503, "the engine died")
    assert status_and_message(APIError(404, "no adapter 'x'")) == (404, "no adapter 'x'")
    assert status_and_message(ValueError("boom"))[0] == 500
