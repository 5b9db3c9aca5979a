"""A pattern's 250 ms limit is time spent matching, not time spent waiting for the GIL.

The regex engine's timeout is wall-clock time and it lets go of the GIL while it matches, so on a busy process a
benign pattern on a short text could "time out" (override pins lost, an access rule applied anyway) and the trace
blamed catastrophic backtracking. ``bounded`` measures its thread's CPU time: a timeout spent waiting is tried again,
holding the GIL; only one spent matching is a PatternTimeout.
"""

from __future__ import annotations

import math
import re
import threading
import time

import pytest

from rules.expressions import (
    REGEX_ATTEMPTS,
    REGEX_MATCHING_SHARE,
    REGEX_TIMEOUT_S,
    PatternStarved,
    PatternTimeout,
    bounded,
    bounded_search,
    compile_pattern,
)

EVIL = "(a|aa)+$"  # on 'a' * 40 + 'b': longer than the age of the universe without a limit
BENIGN = compile_pattern(r"\b(MET-PREG-301|gestational)\b", True)  # a pin's `when` in the medical pack
CAPTURING = compile_pattern(r"(\w+)\s+(protocol|guidance)", True)  # linear, microseconds alone
QUERY = "SEMA-CARD-205 semaglutide cardiovascular outcomes"


def _gil_holding_backtracker(at_least_s: float) -> tuple[re.Pattern[str], str]:
    """A stdlib ``re`` search (which never lets go of the GIL) that takes about ``at_least_s`` on this machine:
    (a|aa)+$ on a's then a 'b' takes 1.618 times longer per 'a', timed here on 24 of them."""
    pattern = re.compile(EVIL)
    took = []
    for _ in range(3):
        started = time.perf_counter()
        pattern.search("a" * 24 + "b")
        took.append(time.perf_counter() - started)
    length = 24 + max(0, math.ceil(math.log(at_least_s / min(took)) / math.log(1.618)))
    return pattern, "a" * length + "b"


def test_a_benign_pattern_never_times_out_while_another_thread_holds_the_gil():
    """Another thread holds the GIL for over the limit at a time (one long C call, as a json.dumps of a big response
    is). The regex engine takes the GIL back while it matches whenever it allocates memory: a search that lost it to
    that thread used to time out, nearly every one of CAPTURING's (whose groups need memory), about one in a hundred
    of BENIGN's. Now such a search is tried again holding the GIL, and none fails."""
    hog, text = _gil_holding_backtracker(1.2 * REGEX_TIMEOUT_S)
    stop = threading.Event()

    def hold_the_gil() -> None:
        while not stop.is_set():
            hog.search(text)

    holder = threading.Thread(target=hold_the_gil, daemon=True)
    holder.start()
    failures: list[str] = []
    searches = 0
    try:
        deadline = time.perf_counter() + 1.2
        while time.perf_counter() < deadline:
            for pattern, subject, expected in ((CAPTURING, QUERY, None), (BENIGN, QUERY, None),
                                               (CAPTURING, "the MET-PREG-301 trial protocol", "trial protocol")):
                searches += 1
                try:
                    found = bounded_search(pattern, subject)
                    assert (found.group(0) if found else None) == expected
                except PatternTimeout as exc:
                    failures.append(str(exc))
        # while the GIL is busy, a pattern that backtracks without end is still a PatternTimeout that says so
        with pytest.raises(PatternTimeout, match="catastrophic backtracking") as caught:
            bounded_search(compile_pattern(EVIL), "a" * 40 + "b")
        assert not isinstance(caught.value, PatternStarved)
    finally:
        stop.set()
        holder.join()
    assert failures == [], f"{len(failures)} of {searches} searches timed out: {failures[0]}"


class _Timed:
    """A pattern's method, each call's thread CPU time recorded."""

    __name__ = "search"

    def __init__(self, method):
        self.method, self.cpu = method, []

    def __call__(self, text, **options):
        started = time.thread_time()
        try:
            return self.method(text, **options)
        finally:
            self.cpu.append(time.thread_time() - started)


def test_a_pattern_that_backtracks_without_end_is_blamed_after_the_attempt_that_spent_its_limit_matching():
    """An attempt that spent its limit on the processor is blamed at once (PatternTimeout, never tried again); one the
    machine kept off the processor is tried again. This used to assert the wall time (under two limits), which failed
    whenever other processes kept the machine busy (the mutation audit's runs): the attempts' CPU times say which case
    each was, whatever the load."""
    evil = compile_pattern(EVIL)
    timed = _Timed(evil.search)
    with pytest.raises((PatternTimeout, PatternStarved)) as caught:
        bounded(timed, evil, "a" * 40 + "b")
    matched = [cpu >= REGEX_TIMEOUT_S * REGEX_MATCHING_SHARE for cpu in timed.cpu]
    assert not any(matched[:-1])  # no attempt that spent its limit matching was tried again
    if matched[-1]:
        assert type(caught.value) is PatternTimeout and "(catastrophic backtracking" in str(caught.value)
    else:  # every attempt kept waiting (a machine busy elsewhere): said so, not blamed on the pattern
        assert type(caught.value) is PatternStarved and len(timed.cpu) == REGEX_ATTEMPTS


class _Waits:
    """A pattern method that keeps its thread off the processor past the limit and then times out, as the regex
    engine does when its thread cannot get the GIL back, ``waits`` times; then it answers. Records how it was
    called."""

    __name__ = "search"

    def __init__(self, waits: int):
        self.waits, self.calls = waits, []

    def __call__(self, text: str, *, timeout: float, concurrent: bool | None = None) -> str:
        self.calls.append(concurrent)
        if len(self.calls) <= self.waits:
            time.sleep(timeout * 1.1)
            raise TimeoutError("regex timed out")
        return text


def test_a_timeout_spent_waiting_is_tried_again_holding_the_gil():
    waits = _Waits(1)
    assert bounded(waits, BENIGN, QUERY) == QUERY
    assert waits.calls == [None, False]  # first as usual (other threads run meanwhile), then holding the GIL


def test_a_pattern_kept_waiting_every_time_is_not_blamed_for_backtracking():
    waits = _Waits(REGEX_ATTEMPTS)
    with pytest.raises(PatternStarved) as caught:
        bounded(waits, BENIGN, QUERY, subject="the rule's pattern")
    assert len(waits.calls) == REGEX_ATTEMPTS
    message = str(caught.value)
    assert message.startswith("the rule's pattern '\\\\b(MET-PREG-301|gestational)\\\\b' could not finish on a text of "
                              f"{len(QUERY)} characters: {REGEX_ATTEMPTS} attempts each ran over 250 ms")
    assert "the process was too busy" in message and "backtracking" not in message
    assert isinstance(caught.value, PatternTimeout)  # handled as one: the rule cannot be evaluated
    assert "MET-PREG" not in caught.value.describe(trace_text=False)  # the pattern quotes no query, but stays out
