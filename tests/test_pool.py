"""
Tests for nextclaude.pool: accounts, their quota windows, serviceability,
status and the ranking key (DESIGN.md, "The routing policy", point 1).

Every quota value comes from real rate-limit header shapes (PROTOCOL.md)
through L{parse_rate_limit_headers}; time is a plain float passed as C{now}.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from nextclaude.config import AccountConfig
from nextclaude.pool import (
    Account,
    AccountPool,
    Status,
    Thresholds,
    UsageTotals,
    model_family,
    window_applies,
)
from nextclaude.quota import QuotaReport, WindowQuota, parse_rate_limit_headers
from nextclaude.usage import Usage

U = "anthropic-ratelimit-unified-"
NOW = 1_750_000_000.0
HOUR = 3600.0
FIVE_HOUR_RESET = NOW + 2 * HOUR
SEVEN_DAY_RESET = NOW + 3 * 24 * HOUR

# PRODUCT.md: priority defaults to 0 for subscription accounts and 1 for API
# keys (the config parser fills it in; AccountConfig is built directly here).
DEFAULT_PRIORITY = {"oauth": 0, "apikey": 1}

OPUS = "claude-opus-4-1-20250805"
SONNET = "claude-sonnet-4-5-20250929"
HAIKU = "claude-3-5-haiku-20241022"


def subscription_headers(
    five: float | None = None,
    seven: float | None = None,
    *,
    status: str = "allowed",
    five_status: str | None = None,
    seven_status: str | None = None,
    five_reset: float = FIVE_HOUR_RESET,
    seven_reset: float = SEVEN_DAY_RESET,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """
    The rate-limit headers of a subscription (OAuth) response, shaped like
    the real thing: aggregate fields, per-window fields, and the overage
    headers of an organisation without extra usage (overage rejected, which
    must never count as a verdict on the subscription windows).
    """
    headers = {
        U + "status": status,
        U + "reset": str(int(five_reset)),
        U + "representative-claim": "five_hour",
        U + "overage-status": "rejected",
        U + "overage-disabled-reason": "org_level_disabled",
        U + "fallback": "available",
        U + "fallback-percentage": "0.5",
        "content-type": "text/event-stream; charset=utf-8",
        "request-id": "req_011CTestRequest",
    }
    if five is not None or five_status is not None:
        headers[U + "5h-status"] = five_status or "allowed"
        headers[U + "5h-reset"] = str(int(five_reset))
        if five is not None:
            headers[U + "5h-utilization"] = repr(five)
    if seven is not None or seven_status is not None:
        headers[U + "7d-status"] = seven_status or "allowed"
        headers[U + "7d-reset"] = str(int(seven_reset))
        if seven is not None:
            headers[U + "7d-utilization"] = repr(seven)
    headers.update(extra or {})
    return headers


def report(*args: Any, **kwargs: Any) -> QuotaReport:
    return parse_rate_limit_headers(subscription_headers(*args, **kwargs), NOW)


def config(name: str, kind: str = "oauth", priority: int | None = None) -> AccountConfig:
    if kind == "oauth":
        secret = {"access_token": "sk-ant-oat01-" + name, "refresh_token": "sk-ant-ort01-" + name}
    else:
        secret = {"api_key": "sk-ant-api03-" + name}
    return AccountConfig(
        name=name,
        type=kind,
        priority=DEFAULT_PRIORITY[kind] if priority is None else priority,
        **secret,
    )


def make_pool(*specs: str | tuple[str, str], switch: float = 0.98, hard: float = 0.995) -> AccountPool:
    """
    A pool from account names (OAuth) or (name, kind) pairs, in config order.
    """
    configs = [config(spec) if isinstance(spec, str) else config(*spec) for spec in specs]
    return AccountPool(configs, Thresholds(switch=switch, hard=hard))


class ModelFamilyTests(SynchronousTestCase):
    def test_model_family(self) -> None:
        """
        The family is read from the model id, case-insensitively; ids naming
        no known family, and missing ids, have none.
        """
        cases = [
            (OPUS, "opus"),
            ("claude-opus-4-5", "opus"),
            (SONNET, "sonnet"),
            ("claude-3-7-sonnet-latest", "sonnet"),
            (HAIKU, "haiku"),
            ("Claude-OPUS-4", "opus"),
            ("gpt-4o", None),
            ("", None),
            (None, None),
        ]
        for model, expected in cases:
            self.assertEqual(model_family(model), expected, model)

    def test_window_applies(self) -> None:
        """
        Per-model weekly windows (7d_opus/7d_sonnet and their seven_day_*
        spellings) limit only requests of their family, or every request
        when the family cannot be told; every other window, including 7d_oi
        whose family the headers do not name, limits the whole account.
        """
        cases = [
            ("5h", "opus", True),
            ("5h", None, True),
            ("7d", "haiku", True),
            ("7d_oi", "opus", True),
            ("7d_oi", "sonnet", True),
            ("7d_oi", None, True),
            ("7d_opus", "opus", True),
            ("7d_opus", "sonnet", False),
            ("7d_opus", "haiku", False),
            ("7d_opus", None, True),
            ("seven_day_opus", "opus", True),
            ("seven_day_opus", "sonnet", False),
            ("7d_sonnet", "sonnet", True),
            ("7d_sonnet", "opus", False),
            ("seven_day_sonnet", "sonnet", True),
            ("seven_day_sonnet", "haiku", False),
            ("seven_day_sonnet", None, True),
        ]
        for window, family, expected in cases:
            self.assertEqual(window_applies(window, family), expected, (window, family))


class AccountTests(SynchronousTestCase):
    def test_tier_defaults(self) -> None:
        """
        Without a configured tier an API key shows "API" and a subscription
        "Pro/Max"; a configured tier wins.
        """
        self.assertEqual(Account(config("a"), 0).tier, "Pro/Max")
        self.assertEqual(Account(config("k", "apikey"), 0).tier, "API")
        self.assertEqual(Account(AccountConfig(name="m", type="oauth", tier="Max"), 0).tier, "Max")

    def test_observe_quota_merges_windows(self) -> None:
        """
        A report replaces the windows it names and keeps the others, so a
        response carrying only the 5h window does not forget the 7d one.
        """
        account = Account(config("a"), 0)
        account.observe_quota(report(0.2, 0.5), NOW)
        account.observe_quota(report(0.3), NOW + 60)
        self.assertEqual(account.utilization("5h", NOW + 60), 0.3)
        self.assertEqual(account.utilization("7d", NOW + 60), 0.5)

    def test_observe_quota_ignores_reports_without_windows(self) -> None:
        """
        A response without unified headers (an API-key answer, a bare 429)
        leaves the known windows as they were.
        """
        account = Account(config("a"), 0)
        account.observe_quota(report(0.2, 0.5), NOW)
        before = dict(account.windows)
        account.observe_quota(parse_rate_limit_headers({"x-should-retry": "true"}), NOW)
        account.observe_quota(
            parse_rate_limit_headers(
                {
                    "anthropic-ratelimit-requests-limit": "4000",
                    "anthropic-ratelimit-requests-remaining": "3999",
                    "anthropic-ratelimit-requests-reset": "2025-06-15T15:07:00Z",
                }
            ),
            NOW,
        )
        self.assertEqual(account.windows, before)

    def test_windows_past_reset_stop_counting(self) -> None:
        """
        A window whose reset has passed is dropped from the live windows: its
        utilization reads 0% and its status no longer counts; at the reset
        instant itself the window is already over.
        """
        account = Account(config("a"), 0)
        account.observe_quota(
            report(0.999, 0.4, five_status="rejected", status="rejected"), NOW
        )
        self.assertEqual(account.utilization("5h", NOW), 0.999)
        self.assertTrue(account.rejected(NOW))
        for now in (FIVE_HOUR_RESET, FIVE_HOUR_RESET + 1):
            self.assertNotIn("5h", account.live_windows(now))
            self.assertEqual(account.utilization("5h", now), 0.0)
            self.assertEqual(account.peak_utilization(now), 0.4)
            self.assertFalse(account.rejected(now))
        self.assertEqual(account.utilization("7d", SEVEN_DAY_RESET + 1), 0.0)

    def test_unknown_quota_is_zero(self) -> None:
        """
        An account never seen, or a window reported without a utilization,
        counts as 0%.
        """
        account = Account(config("a"), 0)
        self.assertEqual(account.utilization("5h", NOW), 0.0)
        self.assertEqual(account.peak_utilization(NOW), 0.0)
        account.observe_quota(report(five_status="allowed"), NOW)
        self.assertIsNone(account.windows["5h"].utilization)
        self.assertEqual(account.utilization("5h", NOW), 0.0)

    def test_peak_utilization_per_family(self) -> None:
        """
        The peak is taken over the windows that apply to the request's model
        family; the overage window never counts.
        """
        account = Account(config("a"), 0)
        account.observe_quota(
            report(
                0.1,
                0.2,
                extra={
                    U + "7d_opus-utilization": "0.9",
                    U + "7d_opus-reset": str(int(SEVEN_DAY_RESET)),
                    U + "7d_sonnet-utilization": "0.6",
                    U + "7d_sonnet-reset": str(int(SEVEN_DAY_RESET)),
                    U + "overage-utilization": "1.0",
                },
            ),
            NOW,
        )
        cases = [("opus", 0.9), ("sonnet", 0.6), ("haiku", 0.2), (None, 0.9)]
        for family, expected in cases:
            self.assertEqual(account.peak_utilization(NOW, family), expected, family)

    def test_soonest_reset(self) -> None:
        """
        The soonest reset is the earliest future one among the live windows
        and the exhausted/throttled deadlines; past deadlines are ignored.
        """
        account = Account(config("a"), 0)
        self.assertIsNone(account.soonest_reset(NOW))
        account.observe_quota(report(0.5, 0.5), NOW)
        self.assertEqual(account.soonest_reset(NOW), FIVE_HOUR_RESET)
        account.throttled_until = NOW + 30
        account.exhausted_until = NOW - 30
        self.assertEqual(account.soonest_reset(NOW), NOW + 30)
        account.exhausted_until = NOW + 10
        self.assertEqual(account.soonest_reset(NOW), NOW + 10)
        self.assertEqual(account.soonest_reset(FIVE_HOUR_RESET + 1), SEVEN_DAY_RESET)


class ServiceableTests(SynchronousTestCase):
    def test_serviceable_and_status(self) -> None:
        """
        An account is serviceable unless it has an error, is throttled, or is
        at the ceiling (hard threshold reached or a rejected window, or a
        quota-429 deadline ahead); the status names the first of error,
        exhausted, throttled, else active.  Past deadlines, past windows and
        a rejected overage window do not count.
        """
        headers_at = {
            "nothing known": None,
            "low": subscription_headers(0.42, 0.91, seven_status="allowed_warning"),
            "just under hard": subscription_headers(0.994, 0.5),
            "at hard 5h": subscription_headers(0.995, 0.5, five_status="allowed_warning"),
            "over 100% 5h": subscription_headers(1.01, 0.5),
            "at hard 7d": subscription_headers(0.3, 0.995),
            "7d_oi at hard": subscription_headers(
                0.3,
                0.4,
                extra={U + "7d_oi-utilization": "0.996", U + "7d_oi-reset": str(int(SEVEN_DAY_RESET))},
            ),
            "5h rejected only": {
                U + "5h-status": "rejected",
                U + "5h-reset": str(int(FIVE_HOUR_RESET)),
            },
            "7d rejected": subscription_headers(0.5, 0.97, seven_status="rejected", status="rejected"),
            "overage rejected only": {
                U + "status": "allowed",
                U + "overage-status": "rejected",
                U + "overage-reset": str(int(SEVEN_DAY_RESET)),
                U + "overage-disabled-reason": "out_of_credits",
            },
        }
        cases = [
            # (headers, error, throttled_until, exhausted_until, now, serviceable, status)
            ("nothing known", None, None, None, NOW, True, Status.ACTIVE),
            ("low", None, None, None, NOW, True, Status.ACTIVE),
            ("just under hard", None, None, None, NOW, True, Status.ACTIVE),
            ("at hard 5h", None, None, None, NOW, False, Status.EXHAUSTED),
            ("at hard 5h", None, None, None, FIVE_HOUR_RESET, True, Status.ACTIVE),
            ("over 100% 5h", None, None, None, NOW, False, Status.EXHAUSTED),
            ("at hard 7d", None, None, None, NOW, False, Status.EXHAUSTED),
            ("7d_oi at hard", None, None, None, NOW, False, Status.EXHAUSTED),
            ("5h rejected only", None, None, None, NOW, False, Status.EXHAUSTED),
            ("5h rejected only", None, None, None, FIVE_HOUR_RESET + 1, True, Status.ACTIVE),
            ("7d rejected", None, None, None, NOW, False, Status.EXHAUSTED),
            ("overage rejected only", None, None, None, NOW, True, Status.ACTIVE),
            ("low", "bad key", None, None, NOW, False, Status.ERROR),
            ("at hard 5h", "bad key", None, None, NOW, False, Status.ERROR),
            ("low", None, NOW + 30, None, NOW, False, Status.THROTTLED),
            ("low", None, NOW + 30, None, NOW + 30, True, Status.ACTIVE),
            ("low", None, NOW - 1, None, NOW, True, Status.ACTIVE),
            ("low", None, None, NOW + 600, NOW, False, Status.EXHAUSTED),
            ("low", None, None, NOW + 600, NOW + 600, True, Status.ACTIVE),
            ("at hard 5h", None, NOW + 30, None, NOW, False, Status.EXHAUSTED),
        ]
        for name, error, throttled, exhausted, now, serviceable, status in cases:
            pool = make_pool("a")
            account = pool.get("a")
            if headers_at[name] is not None:
                account.observe_quota(parse_rate_limit_headers(headers_at[name], NOW), NOW)
            account.error = error
            account.throttled_until = throttled
            account.exhausted_until = exhausted
            label = (name, error, throttled, exhausted, now - NOW)
            self.assertEqual(pool.serviceable(account, now), serviceable, label)
            self.assertEqual(pool.status(account, now), status, label)

    def test_per_model_ceiling(self) -> None:
        """
        A per-model weekly window at the ceiling takes the account out only
        for that family (and for requests whose family is unknown); a 7d_oi
        window at the ceiling takes it out for every family.
        """
        cases = [
            ("7d_opus", {"opus": False, "sonnet": True, "haiku": True, None: False}),
            ("seven_day_opus", {"opus": False, "sonnet": True, "haiku": True, None: False}),
            ("7d_sonnet", {"opus": True, "sonnet": False, "haiku": True, None: False}),
            ("7d_oi", {"opus": False, "sonnet": False, "haiku": False, None: False}),
        ]
        for window, expected in cases:
            for how in ("utilization", "rejected"):
                pool = make_pool("a")
                account = pool.get("a")
                extra = {U + f"{window}-reset": str(int(SEVEN_DAY_RESET))}
                if how == "utilization":
                    extra[U + f"{window}-utilization"] = "1.0"
                else:
                    extra[U + f"{window}-status"] = "rejected"
                account.observe_quota(report(0.2, 0.3, extra=extra), NOW)
                for family, serviceable in expected.items():
                    self.assertEqual(
                        pool.serviceable(account, NOW, family), serviceable, (window, how, family)
                    )
                # After the weekly reset the window is gone.
                self.assertTrue(pool.serviceable(account, SEVEN_DAY_RESET + 1, "opus"))


class RankingTests(SynchronousTestCase):
    def ranked_names(self, pool: AccountPool, now: float = NOW, family: str | None = None) -> list[str]:
        return [account.name for account in pool.ranked(now, family)]

    def observe(self, pool: AccountPool, name: str, headers: dict[str, str]) -> None:
        pool.get(name).observe_quota(parse_rate_limit_headers(headers, NOW), NOW)

    def test_ranking_table(self) -> None:
        """
        The sort key orders serviceable accounts by priority, then whether
        any window is at/over the switch threshold, then 5h and 7d
        utilization in 0.5% steps, then config order.
        """
        cases = [
            # (description, accounts in config order, {name: (5h, 7d)}, expected)
            ("unknown quota counts as 0%", ["a", "b"], {"a": (0.1, 0.1)}, ["b", "a"]),
            ("all unknown: config order", ["a", "b", "c"], {}, ["a", "b", "c"]),
            ("lower 5h first", ["a", "b"], {"a": (0.5, 0.1), "b": (0.2, 0.9)}, ["b", "a"]),
            ("5h equal: lower 7d first", ["a", "b"], {"a": (0.3, 0.6), "b": (0.3, 0.2)}, ["b", "a"]),
            ("5h within 0.5% step: 7d decides", ["a", "b"], {"a": (0.301, 0.6), "b": (0.302, 0.2)}, ["b", "a"]),
            ("near-equal: config order", ["a", "b"], {"a": (0.421, 0.5), "b": (0.420, 0.501)}, ["a", "b"]),
            ("near-equal, reversed config", ["b", "a"], {"a": (0.421, 0.5), "b": (0.420, 0.501)}, ["b", "a"]),
            ("a full step apart", ["a", "b"], {"a": (0.425, 0.1), "b": (0.420, 0.9)}, ["b", "a"]),
            ("over switch in 7d ranks last", ["a", "b"], {"a": (0.1, 0.985), "b": (0.6, 0.6)}, ["b", "a"]),
            ("exactly at switch counts", ["a", "b"], {"a": (0.98, 0.1), "b": (0.97, 0.97)}, ["b", "a"]),
            ("both over switch: 5h decides", ["a", "b"], {"a": (0.99, 0.1), "b": (0.985, 0.1)}, ["b", "a"]),
            ("at hard: not ranked", ["a", "b"], {"a": (0.995, 0.1), "b": (0.9, 0.9)}, ["b"]),
        ]
        for description, names, quota, expected in cases:
            pool = make_pool(*names)
            for name, (five, seven) in quota.items():
                self.observe(pool, name, subscription_headers(five, seven))
            self.assertEqual(self.ranked_names(pool), expected, description)

    def test_priority_first(self) -> None:
        """
        Priority outranks utilization: an API key (default priority 1) comes
        after every subscription account, even a nearly full one, and an
        explicit priority puts an account ahead.
        """
        pool = AccountPool(
            [config("key", "apikey"), config("sub1"), config("sub2"), config("late", priority=5)],
            Thresholds(),
        )
        self.observe(pool, "sub1", subscription_headers(0.97, 0.9))
        self.observe(pool, "sub2", subscription_headers(0.99, 0.5))
        self.assertEqual(pool.get("key").priority, 1)
        self.assertEqual(self.ranked_names(pool), ["sub1", "sub2", "key", "late"])

        pool = AccountPool([config("sub"), config("key", "apikey", priority=-1)], Thresholds())
        self.assertEqual(self.ranked_names(pool), ["key", "sub"])

    def test_rank_key_shape(self) -> None:
        """
        The key is (priority, over switch, 5h in 0.5% steps, 7d in 0.5%
        steps, config order), and unknown quota reads as 0.
        """
        pool = make_pool("a", ("k", "apikey"))
        self.observe(pool, "a", subscription_headers(0.42, 0.985))
        self.assertEqual(pool.rank_key(pool.get("a"), NOW), (0, True, 84, 197, 0))
        self.assertEqual(pool.rank_key(pool.get("k"), NOW), (1, False, 0, 0, 1))

    def test_past_reset_ranks_as_fresh(self) -> None:
        """
        Once an account's windows have reset, its old utilization no longer
        ranks it behind a less-used account.
        """
        pool = make_pool("a", "b")
        self.observe(pool, "a", subscription_headers(0.9, 0.5))
        self.observe(pool, "b", subscription_headers(0.3, 0.5, five_reset=NOW + 4 * HOUR))
        self.assertEqual(self.ranked_names(pool, NOW), ["b", "a"])
        self.assertEqual(self.ranked_names(pool, FIVE_HOUR_RESET), ["a", "b"])

    def test_per_model_windows_rank_per_family(self) -> None:
        """
        A per-model weekly window over the switch threshold ranks the account
        last only for its own family (and when the family is unknown); a
        7d_oi window over it does so for every family.
        """
        for window, demoted_for in [
            ("7d_opus", {"opus", None}),
            ("seven_day_opus", {"opus", None}),
            ("7d_sonnet", {"sonnet", None}),
            ("seven_day_sonnet", {"sonnet", None}),
            ("7d_oi", {"opus", "sonnet", "haiku", None}),
        ]:
            pool = make_pool("a", "b")
            self.observe(
                pool,
                "a",
                subscription_headers(
                    0.1,
                    0.1,
                    extra={
                        U + f"{window}-status": "allowed_warning",
                        U + f"{window}-utilization": "0.99",
                        U + f"{window}-reset": str(int(SEVEN_DAY_RESET)),
                    },
                ),
            )
            self.observe(pool, "b", subscription_headers(0.5, 0.5))
            for family in ("opus", "sonnet", "haiku", None):
                expected = ["b", "a"] if family in demoted_for else ["a", "b"]
                self.assertEqual(self.ranked_names(pool, family=family), expected, (window, family))

    def test_ranked_leaves_out_unserviceable_and_excluded(self) -> None:
        """
        Only serviceable accounts are ranked, and the exclude predicate
        removes the rest it names.
        """
        pool = make_pool("err", "thr", "exh", "full", "ok1", "ok2")
        pool.get("err").error = "401"
        pool.get("thr").throttled_until = NOW + 5
        pool.get("exh").exhausted_until = NOW + 5
        self.observe(pool, "full", subscription_headers(1.0, 0.2))
        self.assertEqual(self.ranked_names(pool), ["ok1", "ok2"])
        self.assertEqual(
            [a.name for a in pool.ranked(NOW, exclude=lambda a: a.name == "ok1")], ["ok2"]
        )
        self.assertEqual(pool.ranked(NOW, exclude=lambda a: True), [])


class UsageTotalsTests(SynchronousTestCase):
    def test_record(self) -> None:
        """
        Recording counts requests and failures, sums token usage, and counts
        cold rebuilds: cache creation above both the cache read and 1000.
        """
        cases = [
            # (usage, ok, is cold rebuild)
            (Usage(input_tokens=5, output_tokens=80, cache_read_input_tokens=40000, cache_creation_input_tokens=900), True, False),
            (Usage(input_tokens=3, output_tokens=10, cache_creation_input_tokens=50000), True, True),
            (Usage(cache_creation_input_tokens=1000), True, False),
            (Usage(cache_creation_input_tokens=1001), True, True),
            (Usage(cache_creation_input_tokens=5000, cache_read_input_tokens=5000), True, False),
            (Usage(cache_creation_input_tokens=5001, cache_read_input_tokens=5000), False, True),
            (None, False, False),
        ]
        totals = UsageTotals()
        for usage, ok, cold in cases:
            before = totals.cold_rebuilds
            totals.record(usage, ok)
            self.assertEqual(totals.cold_rebuilds - before, int(cold), usage)
        self.assertEqual(totals.requests, 7)
        self.assertEqual(totals.failures, 2)
        self.assertEqual(totals.cold_rebuilds, 3)
        self.assertEqual(totals.tokens.input_tokens, 8)
        self.assertEqual(totals.tokens.output_tokens, 90)
        self.assertEqual(totals.tokens.cache_read_input_tokens, 40000 + 5000 + 5000)
        self.assertEqual(totals.tokens.cache_creation_input_tokens, 900 + 50000 + 1000 + 1001 + 5000 + 5001)

    def test_json_round_trip(self) -> None:
        """
        to_json and from_json round-trip through real JSON.
        """
        totals = UsageTotals()
        totals.record(Usage(input_tokens=12, output_tokens=87, cache_read_input_tokens=30000, cache_creation_input_tokens=2048), True)
        totals.record(Usage(cache_creation_input_tokens=40000), False)
        data = json.loads(json.dumps(totals.to_json()))
        self.assertEqual(UsageTotals.from_json(data).to_json(), totals.to_json())

    def test_from_json_malformed(self) -> None:
        """
        Negative, fractional, boolean, textual or missing counts read as 0.
        """
        data = {
            "requests": -3,
            "failures": 1.5,
            "coldRebuilds": True,
            "inputTokens": "12",
            "outputTokens": None,
            "cacheReadTokens": 7,
        }
        self.assertEqual(
            UsageTotals.from_json(data).to_json(),
            {
                "requests": 0,
                "failures": 0,
                "coldRebuilds": 0,
                "inputTokens": 0,
                "outputTokens": 0,
                "cacheReadTokens": 7,
                "cacheCreationTokens": 0,
            },
        )


class AccountStateTests(SynchronousTestCase):
    def test_state_round_trip(self) -> None:
        """
        An account's saved windows, deadlines, usage and last use come back
        from JSON into a fresh account unchanged.
        """
        account = Account(config("a"), 0)
        account.observe_quota(
            report(
                0.42,
                0.91,
                seven_status="allowed_warning",
                extra={U + "7d_oi-utilization": "0.05", U + "7d_oi-reset": str(int(SEVEN_DAY_RESET))},
            ),
            NOW,
        )
        account.exhausted_until = NOW + 100
        account.throttled_until = NOW + 5
        account.last_used = NOW - 1.5
        account.usage.record(Usage(input_tokens=1, output_tokens=2, cache_creation_input_tokens=3000), True)
        saved = json.loads(json.dumps(account.to_state()))

        fresh = Account(config("a"), 0)
        fresh.restore_state(saved)
        self.assertEqual(fresh.to_state(), account.to_state())
        self.assertEqual(fresh.utilization("5h", NOW), 0.42)
        self.assertEqual(fresh.windows["7d"].status, "allowed_warning")
        self.assertEqual(fresh.windows["overage"].status, "rejected")
        self.assertEqual(fresh.usage.cold_rebuilds, 1)

    def test_restore_state_skips_malformed(self) -> None:
        """
        Malformed parts of a saved account are skipped without raising: bad
        windows, non-numeric or boolean numbers, non-string statuses and a
        bad usage object.
        """
        cases = [
            {},
            {"windows": [1, 2]},
            {"windows": {"5h": "full"}},
            {"windows": {"5h": {"utilization": "0.5", "reset": True, "status": 3}}},
            {"windows": {"5h": {}}},
            {"exhaustedUntil": "soon", "throttledUntil": [], "lastUsed": {}},
            {"usage": [1]},
            {"usage": {"requests": "many"}},
        ]
        for data in cases:
            account = Account(config("a"), 0)
            account.restore_state(data)
            self.assertIsNone(account.exhausted_until, data)
            self.assertIsNone(account.throttled_until, data)
            self.assertEqual(account.usage.requests, 0, data)
            for window in account.windows.values():
                self.assertEqual(window, WindowQuota(), data)

    def test_restore_state_refuses_non_finite_numbers(self) -> None:
        """
        Numbers beyond a float's range (JSON 1e400 parses as infinity, a
        400-digit integer cannot become a float) are malformed: they are skipped, so a restored account neither stays
        exhausted forever nor breaks the ranking key.
        """
        for literal in ("1e400", "-1e400", "1" + "0" * 400):
            saved = json.loads(
                '{"windows": {"5h": {"utilization": %s, "reset": %s, "status": "allowed"}},'
                ' "exhaustedUntil": %s, "throttledUntil": %s, "lastUsed": %s}'
                % ((literal,) * 5)
            )
            pool = make_pool("a")
            account = pool.get("a")
            account.restore_state(saved)
            self.assertEqual(account.windows["5h"], WindowQuota(status="allowed"), literal)
            self.assertIsNone(account.exhausted_until, literal)
            self.assertIsNone(account.throttled_until, literal)
            self.assertIsNone(account.last_used, literal)
            self.assertEqual([a.name for a in pool.ranked(NOW)], ["a"], literal)
