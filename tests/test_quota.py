"""Tests for nextclaude.quota: rate-limit headers <-> QuotaReport."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from nextclaude.quota import (
    ApiLimit,
    QuotaReport,
    WindowQuota,
    parse_rate_limit_headers,
    quota_headers,
)

U = "anthropic-ratelimit-unified-"
A = "anthropic-ratelimit-"
NOW = 1_750_000_000.0

# A 200 from a subscription account, shaped like the real thing.
SUBSCRIPTION_200 = {
    U + "status": "allowed",
    U + "reset": "1750003600",
    U + "representative-claim": "five_hour",
    U + "5h-status": "allowed",
    U + "5h-reset": "1750003600",
    U + "5h-utilization": "0.42",
    U + "7d-status": "allowed_warning",
    U + "7d-reset": "1750400000",
    U + "7d-utilization": "0.91",
    U + "7d-surpassed-threshold": "0.9",
    U + "7d_oi-status": "allowed",
    U + "7d_oi-reset": "1750500000",
    U + "7d_oi-utilization": "0.05",
    U + "overage-status": "rejected",
    U + "overage-reset": "1751328000",
    U + "overage-disabled-reason": "org_level_disabled",
    U + "fallback": "available",
    U + "fallback-percentage": "0.5",
    "content-type": "application/json",
    "request-id": "req_011",
}

SUBSCRIPTION_200_REPORT = QuotaReport(
    status="allowed",
    reset=1750003600.0,
    representative_claim="five_hour",
    windows={
        "5h": WindowQuota(utilization=0.42, reset=1750003600.0, status="allowed"),
        "7d": WindowQuota(
            utilization=0.91,
            reset=1750400000.0,
            status="allowed_warning",
            surpassed_threshold=0.9,
        ),
        "7d_oi": WindowQuota(utilization=0.05, reset=1750500000.0, status="allowed"),
        "overage": WindowQuota(reset=1751328000.0, status="rejected"),
    },
    overage_disabled_reason="org_level_disabled",
    fallback="available",
    fallback_percentage=0.5,
)

API_KEY_429 = {
    A + "requests-limit": "50",
    A + "requests-remaining": "0",
    A + "requests-reset": "2025-06-15T15:06:40Z",
    A + "tokens-limit": "100000",
    A + "tokens-remaining": "12000",
    A + "tokens-reset": "2025-06-15T17:06:40+02:00",
    A + "input-tokens-limit": "80000",
    A + "input-tokens-remaining": "10000",
    A + "input-tokens-reset": "2025-06-15T15:06:40.5Z",
    A + "output-tokens-limit": "20000",
    A + "output-tokens-remaining": "2000",
    A + "output-tokens-reset": "2025-06-15T10:36:40-04:30",
    "retry-after": "17",
    "x-should-retry": "true",
}

API_KEY_429_REPORT = QuotaReport(
    api_limits={
        "requests": ApiLimit(limit=50, remaining=0, reset=NOW),
        "tokens": ApiLimit(limit=100000, remaining=12000, reset=NOW),
        "input-tokens": ApiLimit(limit=80000, remaining=10000, reset=NOW + 0.5),
        "output-tokens": ApiLimit(limit=20000, remaining=2000, reset=NOW),
    },
    retry_after=17.0,
    should_retry=True,
)


class ParseTests(SynchronousTestCase):
    def test_whole_responses(self) -> None:
        """Complete header sets parse to the expected report, other headers ignored."""
        cases = [
            ("subscription 200", SUBSCRIPTION_200, SUBSCRIPTION_200_REPORT),
            ("api-key 429", API_KEY_429, API_KEY_429_REPORT),
            ("bare", {"content-type": "text/plain"}, QuotaReport()),
            ("nothing", {}, QuotaReport()),
        ]
        for label, headers, expected in cases:
            self.assertEqual(parse_rate_limit_headers(headers, now=NOW), expected, label)

    def test_single_headers(self) -> None:
        """Each header on its own fills exactly its field, tolerating case and spaces."""
        cases = [
            (U + "status", "rejected", QuotaReport(status="rejected")),
            (U + "status", " Allowed_Warning ", QuotaReport(status="allowed_warning")),
            (U + "status", "something_new", QuotaReport(status="something_new")),
            (U + "reset", "1750000000.25", QuotaReport(reset=1750000000.25)),
            (U + "reset", "+1750000000", QuotaReport(reset=NOW)),
            (U + "representative-claim", "seven_day_opus", QuotaReport(representative_claim="seven_day_opus")),
            (U + "fallback", "available", QuotaReport(fallback="available")),
            (U + "fallback-percentage", "0.5", QuotaReport(fallback_percentage=0.5)),
            (U + "overage-disabled-reason", "out_of_credits", QuotaReport(overage_disabled_reason="out_of_credits")),
            (U + "5h-status", "REJECTED", QuotaReport(windows={"5h": WindowQuota(status="rejected")})),
            (U + "5h-utilization", "1.01", QuotaReport(windows={"5h": WindowQuota(utilization=1.01)})),
            (U + "5h-utilization", "0", QuotaReport(windows={"5h": WindowQuota(utilization=0.0)})),
            (U + "5h-utilization", "1e-3", QuotaReport(windows={"5h": WindowQuota(utilization=0.001)})),
            (U + "5h-surpassed-threshold", "0.75", QuotaReport(windows={"5h": WindowQuota(surpassed_threshold=0.75)})),
            (U + "7d-reset", "1750000000", QuotaReport(windows={"7d": WindowQuota(reset=NOW)})),
            (U + "7d_oi-status", "rejected", QuotaReport(windows={"7d_oi": WindowQuota(status="rejected")})),
            (U + "7d_oi-utilization", "0.3", QuotaReport(windows={"7d_oi": WindowQuota(utilization=0.3)})),
            (U + "overage-status", "allowed", QuotaReport(windows={"overage": WindowQuota(status="allowed")})),
            (U + "overage-reset", "1750000000", QuotaReport(windows={"overage": WindowQuota(reset=NOW)})),
            (U + "30d_sonnet-status", "allowed", QuotaReport(windows={"30d_sonnet": WindowQuota(status="allowed")})),
            (A + "requests-limit", " 50 ", QuotaReport(api_limits={"requests": ApiLimit(limit=50)})),
            (A + "tokens-remaining", "0", QuotaReport(api_limits={"tokens": ApiLimit(remaining=0)})),
            (A + "output-tokens-reset", "2025-06-15t15:06:40z", QuotaReport(api_limits={"output-tokens": ApiLimit(reset=NOW)})),
            (A + "input-tokens-reset", "2025-06-15 15:06:40+00:00", QuotaReport(api_limits={"input-tokens": ApiLimit(reset=NOW)})),
            (A + "requests-reset", "2025-06-15T15:06:40", QuotaReport(api_limits={"requests": ApiLimit(reset=NOW)})),
            (A + "requests-reset", "1750000000", QuotaReport(api_limits={"requests": ApiLimit(reset=NOW)})),
            ("retry-after", "0", QuotaReport(retry_after=0.0)),
            ("retry-after", "2.5", QuotaReport(retry_after=2.5)),
            ("x-should-retry", "True", QuotaReport(should_retry=True)),
            ("x-should-retry", "false", QuotaReport(should_retry=False)),
        ]
        for name, value, expected in cases:
            self.assertEqual(
                parse_rate_limit_headers({name: value}), expected, f"{name}: {value!r}"
            )

    def test_malformed_values_ignored(self) -> None:
        """Garbage, NaN, infinities, negatives and empty values leave the report empty."""
        numeric = [
            U + "reset",
            U + "fallback-percentage",
            U + "5h-utilization",
            U + "5h-reset",
            U + "7d-surpassed-threshold",
            U + "overage-reset",
            "retry-after",
        ]
        bad_numbers = ["", "  ", "NaN", "nan", "inf", "-inf", "Infinity", "-1", "-0.5",
                       "1e999", "1_000", "0x10", "12abc", "abc", "1.2.3", "\u0661\u0662", "1 2"]
        cases = [(name, value) for name in numeric for value in bad_numbers]
        cases += [
            (U + "status", ""),
            (U + "status", "   "),
            (U + "representative-claim", " "),
            (U + "overage-disabled-reason", ""),
            (U + "-status", "rejected"),
            (U + "5h-", "rejected"),
            (U + "5h-colour", "blue"),
            (U + "5h-disabled-reason", "only overage has one"),
            (U + "bad name-status", "rejected"),
            (A + "requests-limit", "1.5"),
            (A + "requests-limit", "-3"),
            (A + "requests-remaining", "9" * 5000),
            (A + "tokens-limit", "lots"),
            (A + "tokens-reset", "tomorrow"),
            (A + "tokens-reset", "2025-13-45T99:99:99Z"),
            (A + "tokens-reset", "0001-01-01T00:00:00+01:00"),
            (A + "tokens-reset", "-5"),
            (A + "requests-colour", "7"),
            ("x-should-retry", "yes"),
            ("x-should-retry", "1"),
            ("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT"),  # no `now` given
            ("retry-after", "not a date"),
        ]
        for name, value in cases:
            report = parse_rate_limit_headers({name: value})
            self.assertTrue(report.is_empty, f"{name}: {value!r} gave {report}")

    def test_retry_after_http_date(self) -> None:
        """An HTTP-date retry-after becomes seconds from `now`, never negative."""
        cases = [
            ("Sun, 15 Jun 2025 15:07:00 GMT", 20.0),
            ("Sun, 15 Jun 2025 15:06:40 GMT", 0.0),
            ("Sun, 15 Jun 2025 15:00:00 GMT", 0.0),
            ("Sun, 15 Jun 2025 17:07:00 +0200", 20.0),
            ("Sun, 15 Jun 2025 15:07:00 -0000", 20.0),
            ("Sunday, garbage", None),
        ]
        for value, expected in cases:
            report = parse_rate_limit_headers({"retry-after": value}, now=NOW)
            self.assertEqual(report.retry_after, expected, value)

    def test_malformed_header_spares_the_others(self) -> None:
        """One bad value drops only itself; its neighbours still parse."""
        headers = dict(SUBSCRIPTION_200)
        headers[U + "5h-utilization"] = "NaN"
        headers[U + "7d-reset"] = "soon"
        report = parse_rate_limit_headers(headers)
        self.assertEqual(report.windows["5h"], WindowQuota(reset=1750003600.0, status="allowed"))
        self.assertEqual(
            report.windows["7d"],
            WindowQuota(utilization=0.91, status="allowed_warning", surpassed_threshold=0.9),
        )
        self.assertEqual(report.status, "allowed")

    @settings(max_examples=300)
    @given(
        st.dictionaries(
            st.one_of(
                st.sampled_from(sorted(SUBSCRIPTION_200) + sorted(API_KEY_429)),
                st.text().map(lambda t: U + t),
                st.text().map(lambda t: A + t),
                st.text(),
            ),
            st.one_of(st.text(), st.from_regex(r"\A[-+ ]?[0-9.eE]{0,12}[a-z]?\Z")),
        ),
        st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    )
    def test_never_raises(self, headers: dict[str, str], now: float | None) -> None:
        """Any header names and values, and any `now`, give a report without raising."""
        report = parse_rate_limit_headers(headers, now=now)
        self.assertIsInstance(report, QuotaReport)
        for value in (report.reset, report.retry_after, report.fallback_percentage):
            self.assertTrue(value is None or (math.isfinite(value) and value >= 0))
        report.is_rejected()
        report.overage_in_use()
        report.soonest_reset()

    def test_non_string_values_ignored(self) -> None:
        """Values or names that are not strings are skipped rather than crashing."""
        headers = {U + "status": None, U + "reset": 5, 7: "x", U + "5h-status": b"rejected"}
        self.assertTrue(parse_rate_limit_headers(headers).is_empty)  # type: ignore[arg-type]


def W(status: str | None = None, reset: float | None = None) -> WindowQuota:
    return WindowQuota(status=status, reset=reset)


class VerdictTests(SynchronousTestCase):
    def test_is_rejected(self) -> None:
        """Rejected means the aggregate or any non-overage window is rejected."""
        cases = [
            ("bare", QuotaReport(), False),
            ("allowed", QuotaReport(status="allowed", windows={"5h": W("allowed")}), False),
            ("warning", QuotaReport(status="allowed_warning"), False),
            ("aggregate only", QuotaReport(status="rejected"), True),
            ("5h window only", QuotaReport(windows={"5h": W("rejected")}), True),
            ("7d window only", QuotaReport(windows={"7d": W("rejected"), "5h": W("allowed")}), True),
            ("7d_oi window only", QuotaReport(windows={"7d_oi": W("rejected")}), True),
            ("overage only", QuotaReport(status="allowed", windows={"overage": W("rejected")}), False),
            (
                "overage in use",
                QuotaReport(status="rejected", windows={"5h": W("rejected"), "overage": W("allowed")}),
                True,
            ),
        ]
        for label, report, expected in cases:
            self.assertEqual(report.is_rejected(), expected, label)

    def test_rejected_windows(self) -> None:
        """rejected_windows lists rejected windows by name, sorted, never overage."""
        report = QuotaReport(
            windows={
                "7d": W("rejected"),
                "overage": W("rejected"),
                "5h": W("rejected"),
                "7d_oi": W("allowed"),
            }
        )
        self.assertEqual(report.rejected_windows(), ["5h", "7d"])

    def test_overage_in_use(self) -> None:
        """Overage is in use when the subscription is rejected but overage is allowed."""
        cases = [
            ("aggregate + overage allowed", QuotaReport(status="rejected", windows={"overage": W("allowed")}), True),
            ("window + overage warning", QuotaReport(windows={"5h": W("rejected"), "overage": W("allowed_warning")}), True),
            ("overage rejected too", QuotaReport(status="rejected", windows={"overage": W("rejected")}), False),
            ("no overage header", QuotaReport(status="rejected"), False),
            ("not rejected", QuotaReport(status="allowed", windows={"overage": W("allowed")}), False),
        ]
        for label, report, expected in cases:
            self.assertEqual(report.overage_in_use(), expected, label)

    def test_soonest_reset(self) -> None:
        """soonest_reset prefers rejected windows, then the aggregate, then any window, then API limits."""
        cases = [
            ("nothing", QuotaReport(), None),
            (
                "rejected windows win",
                QuotaReport(
                    reset=10.0,
                    windows={"5h": W("rejected", 300.0), "7d": W("rejected", 200.0), "7d_oi": W("allowed", 5.0)},
                ),
                200.0,
            ),
            (
                "overage never counts as rejected",
                QuotaReport(reset=50.0, windows={"overage": W("rejected", 5.0)}),
                50.0,
            ),
            ("aggregate next", QuotaReport(reset=50.0, windows={"5h": W("allowed", 5.0)}), 50.0),
            ("rejected window without reset", QuotaReport(reset=50.0, windows={"5h": W("rejected")}), 50.0),
            ("any window", QuotaReport(windows={"5h": W("allowed", 70.0), "7d": W(None, 60.0)}), 60.0),
            (
                "api limits last",
                QuotaReport(api_limits={"tokens": ApiLimit(reset=9.0), "requests": ApiLimit(reset=8.0)}),
                8.0,
            ),
        ]
        for label, report, expected in cases:
            self.assertEqual(report.soonest_reset(), expected, label)

    def test_has_unified_and_is_empty(self) -> None:
        """has_unified sees any unified value; is_empty only a response with nothing at all."""
        cases = [
            (QuotaReport(), False, True),
            (QuotaReport(status="allowed"), True, False),
            (QuotaReport(fallback="available"), True, False),
            (QuotaReport(windows={"5h": W("allowed")}), True, False),
            (QuotaReport(api_limits={"tokens": ApiLimit(limit=1)}), False, False),
            (QuotaReport(retry_after=3.0), False, False),
            (QuotaReport(should_retry=True), False, False),
        ]
        for report, unified, empty in cases:
            self.assertEqual((report.has_unified, report.is_empty), (unified, empty), repr(report))


statuses = st.one_of(
    st.sampled_from(["allowed", "allowed_warning", "rejected"]),
    st.from_regex(r"\A[a-z_]{1,12}\Z"),
)
numbers = st.one_of(
    st.integers(min_value=0, max_value=4_000_000_000).map(float),
    st.floats(min_value=0, allow_nan=False, allow_infinity=False),
)
labels = st.from_regex(r"\A[a-z_]{1,16}\Z")
windows = st.builds(
    WindowQuota,
    utilization=st.none() | numbers,
    reset=st.none() | numbers,
    status=st.none() | statuses,
    surpassed_threshold=st.none() | numbers,
).filter(lambda w: w != WindowQuota())
api_limits = st.builds(
    ApiLimit,
    limit=st.none() | st.integers(min_value=0, max_value=10**20),
    remaining=st.none() | st.integers(min_value=0, max_value=10**20),
    # RFC 3339 carries microseconds at best: whole seconds round-trip exactly.
    reset=st.none() | st.integers(min_value=0, max_value=4_000_000_000).map(float),
).filter(lambda a: a != ApiLimit())
reports = st.builds(
    QuotaReport,
    status=st.none() | statuses,
    reset=st.none() | numbers,
    representative_claim=st.none() | labels,
    windows=st.dictionaries(st.from_regex(r"\A[a-z0-9_]{1,8}\Z"), windows, max_size=4),
    overage_disabled_reason=st.none() | labels,
    fallback=st.none() | labels,
    fallback_percentage=st.none() | numbers,
    api_limits=st.dictionaries(
        st.sampled_from(["requests", "tokens", "input-tokens", "output-tokens"]), api_limits
    ),
    retry_after=st.none() | numbers,
    should_retry=st.none() | st.booleans(),
)


class HeadersTests(SynchronousTestCase):
    def test_synthetic_429(self) -> None:
        """quota_headers writes the unified headers a synthetic 429 needs, plus retry-after."""
        report = QuotaReport(
            status="rejected",
            reset=1750003600.0,
            representative_claim="five_hour",
            windows={"5h": WindowQuota(status="rejected", reset=1750003600.0, utilization=1.01)},
            retry_after=55.0,
        )
        self.assertEqual(
            quota_headers(report),
            {
                U + "status": "rejected",
                U + "reset": "1750003600",
                U + "representative-claim": "five_hour",
                U + "5h-status": "rejected",
                U + "5h-utilization": "1.01",
                U + "5h-reset": "1750003600",
                "retry-after": "55",
            },
        )

    def test_api_limits_and_flags(self) -> None:
        """API limits are written with RFC 3339 resets; x-should-retry as true/false."""
        report = QuotaReport(
            api_limits={"tokens": ApiLimit(limit=10, remaining=0, reset=NOW)}, should_retry=False
        )
        self.assertEqual(
            quota_headers(report),
            {
                A + "tokens-limit": "10",
                A + "tokens-remaining": "0",
                A + "tokens-reset": "2025-06-15T15:06:40Z",
                "x-should-retry": "false",
            },
        )

    def test_whole_responses_round_trip(self) -> None:
        """The realistic reports above survive quota_headers and parsing unchanged."""
        for report in (SUBSCRIPTION_200_REPORT, API_KEY_429_REPORT, QuotaReport()):
            self.assertEqual(parse_rate_limit_headers(quota_headers(report)), report)

    @settings(max_examples=300)
    @given(reports)
    def test_round_trip(self, report: QuotaReport) -> None:
        """parse_rate_limit_headers(quota_headers(r)) == r for any representable report."""
        self.assertEqual(parse_rate_limit_headers(quota_headers(report)), report)
