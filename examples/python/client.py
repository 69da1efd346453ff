#!/usr/bin/env python3
"""A small Python client for ratekeeper's two gRPC APIs.

    python client.py [--addr HOST:PORT] [--key KEY --value VALUE]
        Asks once through each API and prints the answers:
        ratekeeper.v1.RateLimiter/ShouldAllow (ratekeeper's own API) and
        envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit (Envoy's).

    python client.py --addr HOST:PORT --check
        Checks the answers of a server started with examples/config.yaml
        against that file; exits non-zero with a message on the first mismatch.
        run.sh starts a server and runs this; CI runs run.sh.

The stubs are generated into ./gen by generate.sh; see README.md.
"""

import argparse
import os
import sys
import time
import uuid

# The generated modules (ratekeeper/v1/..., envoy/...) live in ./gen and import
# each other by their proto package path, so ./gen goes on the import path.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gen"))

try:
    import grpc
    from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
    from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
    from ratekeeper.v1 import ratekeeper_pb2, ratekeeper_pb2_grpc
except ImportError as err:
    sys.exit(
        f"client.py: {err}\n"
        "install requirements.txt and run generate.sh first (run.sh does both)"
    )

# Short names for the message and enum types used below.
Allow = ratekeeper_pb2.ShouldAllowRequest
Decision = ratekeeper_pb2.Decision
Algorithm = ratekeeper_pb2.Algorithm
EnvoyDescriptor = ratelimit_pb2.RateLimitDescriptor
EnvoyRequest = rls_pb2.RateLimitRequest
EnvoyCode = rls_pb2.RateLimitResponse.Code
EnvoyUnit = rls_pb2.RateLimitResponse.RateLimit.Unit

# Deadline of every call, in seconds.
CALL_TIMEOUT = 5.0

# What examples/config.yaml says; --check compares the answers against these.
DOMAIN = "example"
API_KEY_RULE = "per-api-key"  # - key: api_key, name: per-api-key,
API_KEY_LIMIT = 100  #            100 requests ...
API_KEY_WINDOW = 60  #            ... per minute, fixed window
UPLOAD_LIMIT = 60  # - key: upload: token bucket, 60 per hour,
UPLOAD_BURST = 20  #                bursts of up to 20
TENANT_LIMIT = 1000  # - key: tenant: 1000 per hour, shadow mode


# ---------------------------------------------------------------------------
# Building requests
# ---------------------------------------------------------------------------


def descriptor(*entries):
    """A ShouldAllow descriptor from (key, value) pairs, outermost first."""
    return ratekeeper_pb2.Descriptor(
        entries=[ratekeeper_pb2.Entry(key=k, value=v) for k, v in entries]
    )


def envoy_descriptor(*entries):
    """An Envoy RateLimitDescriptor from (key, value) pairs."""
    return EnvoyDescriptor(
        entries=[EnvoyDescriptor.Entry(key=k, value=v) for k, v in entries]
    )


def seconds(duration):
    """A google.protobuf.Duration as float seconds."""
    return duration.seconds + duration.nanos / 1e9


def optional_seconds(message, field):
    """An optional Duration field as '1.234s', or '-' when absent."""
    if not message.HasField(field):
        return "-"
    return f"{seconds(getattr(message, field)):.3f}s"


# ---------------------------------------------------------------------------
# Demo mode: ask once through each API and print the answers
# ---------------------------------------------------------------------------


def print_should_allow(response):
    print(f"ShouldAllow: allowed={response.allowed} "
          f"retry_after={optional_seconds(response, 'retry_after')}")
    for i, r in enumerate(response.results):
        print(f"  results[{i}]: decision={Decision.Name(r.decision)} "
              f"rule_name={r.rule_name!r} limit={r.limit} remaining={r.remaining} "
              f"burst={r.burst} algorithm={Algorithm.Name(r.algorithm)}")
        print(f"               window={optional_seconds(r, 'window')} "
              f"reset_after={optional_seconds(r, 'reset_after')} "
              f"retry_after={optional_seconds(r, 'retry_after')} "
              f"unlimited={r.unlimited} shadow_mode={r.shadow_mode}")


def print_should_rate_limit(response):
    print(f"ShouldRateLimit: overall_code={EnvoyCode.Name(response.overall_code)}")
    for i, s in enumerate(response.statuses):
        line = f"  statuses[{i}]: code={EnvoyCode.Name(s.code)}"
        if s.HasField("current_limit"):
            limit = s.current_limit
            line += (f" current_limit={limit.requests_per_unit}/"
                     f"{EnvoyUnit.Name(limit.unit)} name={limit.name!r}")
        line += (f" limit_remaining={s.limit_remaining}"
                 f" duration_until_reset={optional_seconds(s, 'duration_until_reset')}")
        print(line)


def demo(channel, domain, key, value):
    # ratekeeper's own API: one descriptor, cost 1 (0 would also mean 1).
    should_allow = ratekeeper_pb2_grpc.RateLimiterStub(channel).ShouldAllow
    response = should_allow(
        Allow(domain=domain, descriptors=[descriptor((key, value))], cost=1),
        timeout=CALL_TIMEOUT,
    )
    print_should_allow(response)

    # Envoy's API, as an Envoy rate limit filter would call it.
    should_rate_limit = rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit
    response = should_rate_limit(
        EnvoyRequest(domain=domain, descriptors=[envoy_descriptor((key, value))]),
        timeout=CALL_TIMEOUT,
    )
    print_should_rate_limit(response)


# ---------------------------------------------------------------------------
# --check mode: the answers must match examples/config.yaml
# ---------------------------------------------------------------------------


class Mismatch(Exception):
    """An answer that is not what examples/config.yaml and the API promise."""


def expect(condition, message):
    # Not `assert`: that disappears under `python -O`.
    if not condition:
        raise Mismatch(message)


def expect_eq(actual, expected, what):
    expect(actual == expected, f"{what}: expected {expected!r}, got {actual!r}")


def unique(prefix):
    """A descriptor value no earlier run has used, so every counter starts full."""
    return f"{prefix}-{uuid.uuid4().hex}"


def expect_invalid_argument(call, request, field):
    """The call must fail with INVALID_ARGUMENT and a message naming `field`."""
    try:
        call(request, timeout=CALL_TIMEOUT)
    except grpc.RpcError as err:
        expect_eq(err.code(), grpc.StatusCode.INVALID_ARGUMENT, f"status for bad {field}")
        expect(field in (err.details() or ""),
               f"INVALID_ARGUMENT message {err.details()!r} does not name {field!r}")
        return
    raise Mismatch(f"a request with a bad {field} was answered instead of refused")


def away_from_window_end(remaining_seconds, margin=10.0):
    """Waits out the current minute if it ends within `margin` seconds.

    The api_key limit is a fixed window aligned to the minute: a counter that
    is being exhausted must not be reset half-way by the window ending. Returns
    True when it waited (the caller then starts again with a fresh value).
    """
    if remaining_seconds >= margin:
        return False
    print(f"  (window ends in {remaining_seconds:.1f}s; waiting for the next one)")
    time.sleep(remaining_seconds + 0.5)
    return True


def check_should_allow(channel):
    call = ratekeeper_pb2_grpc.RateLimiterStub(channel).ShouldAllow

    def ask(*descriptors, cost=0, dry_run=False):
        return call(Allow(domain=DOMAIN, descriptors=list(descriptors),
                          cost=cost, dry_run=dry_run), timeout=CALL_TIMEOUT)

    # A fresh api_key: allowed, per-api-key's limit, one hit taken.
    while True:
        key = unique("py-check")
        first = ask(descriptor(("api_key", key)))
        expect_eq(len(first.results), 1, "ShouldAllow: number of results")
        r = first.results[0]
        if not away_from_window_end(seconds(r.reset_after)):
            break
    expect_eq(first.allowed, True, "ShouldAllow(api_key): allowed")
    expect(not first.HasField("retry_after"), "ShouldAllow(api_key): retry_after set while allowed")
    expect_eq(Decision.Name(r.decision), "DECISION_ALLOWED", "ShouldAllow(api_key): decision")
    expect_eq(r.rule_name, API_KEY_RULE, "ShouldAllow(api_key): rule_name")
    expect_eq(r.limit, API_KEY_LIMIT, "ShouldAllow(api_key): limit")
    expect_eq(r.remaining, API_KEY_LIMIT - 1, "ShouldAllow(api_key): remaining after 1 hit")
    expect_eq(r.burst, API_KEY_LIMIT, "ShouldAllow(api_key): burst")
    expect_eq(Algorithm.Name(r.algorithm), "ALGORITHM_FIXED_WINDOW", "ShouldAllow(api_key): algorithm")
    expect_eq(seconds(r.window), float(API_KEY_WINDOW), "ShouldAllow(api_key): window (s)")
    expect(0 < seconds(r.reset_after) <= API_KEY_WINDOW,
           f"ShouldAllow(api_key): reset_after {seconds(r.reset_after)}s not in (0, {API_KEY_WINDOW}]")
    expect(not r.HasField("retry_after"), "ShouldAllow(api_key): result retry_after set while allowed")
    expect(not r.unlimited and not r.shadow_mode, "ShouldAllow(api_key): unlimited/shadow_mode set")

    # dry_run answers but consumes nothing.
    dry = ask(descriptor(("api_key", key)), dry_run=True)
    expect_eq(dry.allowed, True, "ShouldAllow(dry_run): allowed")
    expect_eq(dry.results[0].remaining, API_KEY_LIMIT - 1, "ShouldAllow(dry_run): remaining")

    # Hit until the limit is used up: exactly API_KEY_LIMIT hits are allowed.
    # Bounded: at most API_KEY_LIMIT - 1 more calls.
    for hit in range(2, API_KEY_LIMIT + 1):
        response = ask(descriptor(("api_key", key)))
        expect(response.allowed,
               f"ShouldAllow: hit {hit} denied, expected the limit of {API_KEY_LIMIT} to admit it")
        expect_eq(response.results[0].remaining, API_KEY_LIMIT - hit,
                  f"ShouldAllow: remaining after hit {hit}")

    # One more: denied, with a time to wait before retrying.
    denied = ask(descriptor(("api_key", key)))
    d = denied.results[0]
    expect_eq(denied.allowed, False, f"ShouldAllow: allowed after {API_KEY_LIMIT} hits")
    expect_eq(Decision.Name(d.decision), "DECISION_DENIED", "ShouldAllow(over limit): decision")
    expect_eq(d.remaining, 0, "ShouldAllow(over limit): remaining")
    expect(d.HasField("retry_after"), "ShouldAllow(over limit): result retry_after missing")
    expect(denied.HasField("retry_after"), "ShouldAllow(over limit): retry_after missing")
    expect(0 < seconds(denied.retry_after) <= API_KEY_WINDOW,
           f"ShouldAllow(over limit): retry_after {seconds(denied.retry_after)}s "
           f"not in (0, {API_KEY_WINDOW}]")
    expect_eq(seconds(denied.retry_after), seconds(d.retry_after),
              "ShouldAllow(over limit): request retry_after vs the denied result's")

    # All or nothing: with the exhausted key in the request, a fresh key's
    # counter is reported but not consumed.
    other = unique("py-check")
    mixed = ask(descriptor(("api_key", key)), descriptor(("api_key", other)))
    expect_eq(mixed.allowed, False, "ShouldAllow(exhausted + fresh key): allowed")
    expect_eq([Decision.Name(x.decision) for x in mixed.results],
              ["DECISION_DENIED", "DECISION_ALLOWED"],
              "ShouldAllow(exhausted + fresh key): decisions")
    expect_eq(mixed.results[1].remaining, API_KEY_LIMIT,
              "ShouldAllow(exhausted + fresh key): fresh key's remaining (nothing consumed)")
    print(f"ok  ShouldAllow api_key: {API_KEY_LIMIT} allowed, then denied with "
          f"retry_after {seconds(denied.retry_after):.3f}s; dry_run and all-or-nothing hold")

    # The other kinds of rule in examples/config.yaml.
    upload = ask(descriptor(("upload", unique("file")))).results[0]
    expect_eq(Algorithm.Name(upload.algorithm), "ALGORITHM_TOKEN_BUCKET", "ShouldAllow(upload): algorithm")
    expect_eq((upload.limit, upload.burst, upload.remaining),
              (UPLOAD_LIMIT, UPLOAD_BURST, UPLOAD_BURST - 1),
              "ShouldAllow(upload): (limit, burst, remaining)")
    expect_eq(seconds(upload.window), 3600.0, "ShouldAllow(upload): window (s)")

    tenant = ask(descriptor(("tenant", unique("t")))).results[0]
    expect_eq((tenant.shadow_mode, tenant.limit), (True, TENANT_LIMIT),
              "ShouldAllow(tenant): (shadow_mode, limit)")

    # plan=premium is unlimited and replaces per-api-key when both match.
    premium = ask(descriptor(("plan", "premium")), descriptor(("api_key", unique("k"))))
    expect_eq(premium.allowed, True, "ShouldAllow(premium): allowed")
    expect_eq(premium.results[0].unlimited, True, "ShouldAllow(premium): unlimited")
    expect_eq(Decision.Name(premium.results[1].decision), "DECISION_NO_RULE",
              "ShouldAllow(premium + api_key): api_key decision (replaced)")

    # No matching rule, or a domain nobody configured: allowed, NO_RULE.
    for domain, key_name in [(DOMAIN, "no-such-key"), ("no-such-domain", "api_key")]:
        response = call(Allow(domain=domain, descriptors=[descriptor((key_name, "x"))]),
                        timeout=CALL_TIMEOUT)
        expect_eq((response.allowed, Decision.Name(response.results[0].decision),
                   response.results[0].limit),
                  (True, "DECISION_NO_RULE", 0),
                  f"ShouldAllow(domain={domain!r}, {key_name}): (allowed, decision, limit)")
    print("ok  ShouldAllow upload (token bucket), tenant (shadow), premium (unlimited), no rule")

    # Bad input is INVALID_ARGUMENT naming the field.
    expect_invalid_argument(call, Allow(domain="", descriptors=[descriptor(("api_key", "x"))]),
                            "domain")
    expect_invalid_argument(call, Allow(domain=DOMAIN), "descriptors")
    expect_invalid_argument(call, Allow(domain=DOMAIN, descriptors=[descriptor(("", "x"))]),
                            "descriptors[0].entries[0].key")
    print("ok  ShouldAllow invalid requests: INVALID_ARGUMENT")


def check_should_rate_limit(channel):
    call = rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit

    def ask(key):
        return call(EnvoyRequest(domain=DOMAIN, descriptors=[envoy_descriptor(("api_key", key))]),
                    timeout=CALL_TIMEOUT)

    # A fresh api_key: OK, with per-api-key's limit and one hit counted.
    while True:
        key = unique("py-check-envoy")
        first = ask(key)
        expect_eq(len(first.statuses), 1, "ShouldRateLimit: number of statuses")
        s = first.statuses[0]
        if not away_from_window_end(seconds(s.duration_until_reset)):
            break
    expect_eq(EnvoyCode.Name(first.overall_code), "OK", "ShouldRateLimit(api_key): overall_code")
    expect_eq(EnvoyCode.Name(s.code), "OK", "ShouldRateLimit(api_key): code")
    expect_eq((s.current_limit.requests_per_unit, EnvoyUnit.Name(s.current_limit.unit),
               s.current_limit.name),
              (API_KEY_LIMIT, "MINUTE", API_KEY_RULE),
              "ShouldRateLimit(api_key): current_limit (requests_per_unit, unit, name)")
    expect_eq(s.limit_remaining, API_KEY_LIMIT - 1, "ShouldRateLimit(api_key): limit_remaining")
    expect(1 <= s.duration_until_reset.seconds <= API_KEY_WINDOW,
           f"ShouldRateLimit(api_key): duration_until_reset {s.duration_until_reset.seconds}s "
           f"not in [1, {API_KEY_WINDOW}]")

    # Exactly API_KEY_LIMIT hits are OK (bounded loop), the next is OVER_LIMIT.
    for hit in range(2, API_KEY_LIMIT + 1):
        response = ask(key)
        expect_eq(EnvoyCode.Name(response.overall_code), "OK",
                  f"ShouldRateLimit: overall_code of hit {hit} (limit {API_KEY_LIMIT})")
        expect_eq(response.statuses[0].limit_remaining, API_KEY_LIMIT - hit,
                  f"ShouldRateLimit: limit_remaining after hit {hit}")
    over = ask(key)
    expect_eq(EnvoyCode.Name(over.overall_code), "OVER_LIMIT",
              f"ShouldRateLimit: overall_code after {API_KEY_LIMIT} hits")
    expect_eq((EnvoyCode.Name(over.statuses[0].code), over.statuses[0].limit_remaining),
              ("OVER_LIMIT", 0), "ShouldRateLimit(over limit): (code, limit_remaining)")
    print(f"ok  ShouldRateLimit api_key: {API_KEY_LIMIT} OK, then OVER_LIMIT")

    # Unknown domain: OK and no limit, as envoyproxy/ratelimit answers.
    unknown = call(EnvoyRequest(domain="no-such-domain",
                                descriptors=[envoy_descriptor(("api_key", "x"))]),
                   timeout=CALL_TIMEOUT)
    expect_eq((EnvoyCode.Name(unknown.overall_code), EnvoyCode.Name(unknown.statuses[0].code),
               unknown.statuses[0].HasField("current_limit")),
              ("OK", "OK", False), "ShouldRateLimit(unknown domain): (overall_code, code, has limit)")

    expect_invalid_argument(call, EnvoyRequest(domain="", descriptors=[envoy_descriptor(("api_key", "x"))]),
                            "domain")
    expect_invalid_argument(call, EnvoyRequest(domain=DOMAIN), "descriptors")
    print("ok  ShouldRateLimit unknown domain: OK; invalid requests: INVALID_ARGUMENT")


def check(channel):
    try:
        check_should_allow(channel)
        check_should_rate_limit(channel)
    except Mismatch as err:
        print(f"FAIL: {err}", file=sys.stderr)
        return 1
    except grpc.RpcError as err:
        print(f"FAIL: unexpected gRPC error {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default="127.0.0.1:8081",
                        help="ratekeeper's gRPC address (default: %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="check the answers against examples/config.yaml (for CI)")
    parser.add_argument("--domain", default=DOMAIN, help="demo: domain (default: %(default)s)")
    parser.add_argument("--key", default="api_key", help="demo: descriptor key (default: %(default)s)")
    parser.add_argument("--value", default="demo", help="demo: descriptor value (default: %(default)s)")
    args = parser.parse_args()

    # Plaintext gRPC; for a TLS server use grpc.secure_channel with
    # grpc.ssl_channel_credentials(root_certificates=...).
    with grpc.insecure_channel(args.addr) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=10)
        except grpc.FutureTimeoutError:
            print(f"FAIL: no gRPC server reachable at {args.addr} within 10s", file=sys.stderr)
            return 1
        if args.check:
            return check(channel)
        try:
            demo(channel, args.domain, args.key, args.value)
        except grpc.RpcError as err:
            print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
