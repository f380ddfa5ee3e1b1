# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Circuit-breaking state, sans-IO (callers pass `now`).

RetryBudget: may one more retry start?
- concurrency form (Envoy's retry_budget): retries in progress must stay below
  max(min_retry_concurrency, budget_percent% of requests in progress);
- windowed form (Linkerd's, `window` > 0): retries started over the last `window` seconds
  must stay below max(min_retry_concurrency, budget_percent% of requests started over it).
  The window is a ring of BUCKETS buckets, so it slides in steps of window/BUCKETS and costs
  O(1) per request.
"""

from libc.math cimport floor

cdef enum:
    BUCKETS = 10  # must match the array sizes in circuit_state.pxd


cdef class RetryBudget:
    # Attributes are declared in circuit_state.pxd; `epoch` is the index of the bucket
    # `now` falls in, counted from time 0.

    def __init__(self, double budget_percent, long min_retry_concurrency, double window=0.0):
        cdef int k
        self.percent = budget_percent / 100.0
        self.min_retries = min_retry_concurrency
        self.window = window
        self.width = window / BUCKETS if window > 0 else 1.0
        for k in range(BUCKETS):
            self.requests[k] = 0
            self.retries[k] = 0
        self.epoch = 0

    cdef void _advance(self, double now):
        cdef long long e = <long long>floor(now / self.width)
        cdef long long k
        if e <= self.epoch:
            return
        if e - self.epoch >= BUCKETS:
            for k in range(BUCKETS):
                self.requests[k] = 0
                self.retries[k] = 0
        else:
            k = self.epoch + 1
            while k <= e:
                self.requests[k % BUCKETS] = 0
                self.retries[k % BUCKETS] = 0
                k += 1
        self.epoch = e

    cpdef void record_request(self, double now):
        if self.window > 0:
            self._advance(now)
            self.requests[self.epoch % BUCKETS] += 1

    cpdef bint allow(self, double now, long active_requests, long active_retries):
        """True when one more retry fits the budget; the caller then calls record_retry."""
        cdef long long reqs = 0, rets = 0
        cdef double limit
        cdef int k
        if self.window <= 0:
            limit = self.percent * active_requests
            if limit < self.min_retries:
                limit = self.min_retries
            return active_retries < limit
        self._advance(now)
        for k in range(BUCKETS):
            reqs += self.requests[k]
            rets += self.retries[k]
        limit = self.percent * reqs
        if limit < self.min_retries:
            limit = self.min_retries
        return rets < limit

    cpdef void record_retry(self, double now):
        if self.window > 0:
            self._advance(now)
            self.retries[self.epoch % BUCKETS] += 1


cdef class Breaker:
    """A cluster's circuit breakers in one worker (Envoy's thresholds, this worker's share).

    Requests and retries in progress are counted here, and only here: each `try_*` either
    admits (and counts) or refuses, and each admission is ended by its `end_*`. Connections
    are counted by the endpoints (they outlive a reload's new Breaker), passed in by the
    caller. The caller turns a refusal into 503 UO (or, for a retry, no retry).
    """

    def __init__(self, long max_connections, long max_pending, long max_requests,
                 long max_retries):
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.max_requests = max_requests
        self.max_retries = max_retries
        self.requests = 0
        self.pending = 0
        self.retries = 0

    cpdef bint try_request(self):
        if self.requests >= self.max_requests:
            return False
        self.requests += 1
        return True

    cpdef void end_request(self):
        self.requests -= 1

    cpdef bint connection_room(self, long open_connections):
        return open_connections < self.max_connections

    cpdef bint try_pending(self):
        if self.pending >= self.max_pending:
            return False
        self.pending += 1
        return True

    cpdef void end_pending(self):
        self.pending -= 1

    cpdef bint retry_room(self):
        return self.retries < self.max_retries

    cpdef bint try_retry(self):
        """Admit one more retry in progress (max_retries); the caller calls end_retry once
        that retry's attempt has ended, whatever its outcome. A retry is counted only while
        its attempt runs (Envoy's), so one request with num_retries 3 under max_retries 1
        gets all four attempts: each retry ends before the next is admitted."""
        if self.retries >= self.max_retries:
            return False
        self.retries += 1
        return True

    cpdef void end_retry(self):
        self.retries -= 1


cdef class OutlierState:
    """One endpoint's passive health in one worker (Envoy's outlier detection).

    `record` is called with each result from the endpoint: a 5xx or a locally originated
    failure (connect failure, reset, timeout) counts towards consecutive_5xx; 502, 503,
    504 and local failures towards consecutive_gateway_failure; any other result resets
    both. It returns which rule, if any, asks for an ejection now; the detector decides
    (max_ejection_percent, enforcing_*). Interval counts feed success-rate and
    failure-percentage ejection.

    An ejection lasts base_ejection_time x times ejected, capped at max_ejection_time
    (Envoy's); an endpoint that stays healthy through an interval after coming back has its
    ejection count decremented, so a flapping endpoint is ejected for longer each time.
    """

    def __init__(self):
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.successes = 0
        self.failures = 0
        self.times_ejected = 0
        self.ejected_until = 0.0
        self.ejected = False

    cpdef int record(self, bint error, bint gateway, long max_5xx, long max_gateway):
        """0: nothing; 1: consecutive_5xx reached; 2: consecutive_gateway_failure reached."""
        if not error:
            self.consecutive_5xx = 0
            self.consecutive_gateway = 0
            self.successes += 1
            return 0
        self.failures += 1
        self.consecutive_5xx += 1
        if gateway:
            self.consecutive_gateway += 1
        else:
            self.consecutive_gateway = 0
        if self.ejected:
            return 0
        if max_5xx > 0 and self.consecutive_5xx >= max_5xx:
            return 1
        if max_gateway > 0 and self.consecutive_gateway >= max_gateway:
            return 2
        return 0

    cpdef void eject(self, double now, double base, double max_time):
        cdef double duration
        self.times_ejected += 1
        duration = base * self.times_ejected
        if duration > max_time:
            duration = max_time
        self.ejected_until = now + duration
        self.ejected = True
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0

    cpdef bint maybe_return(self, double now):
        """Bring an ejected endpoint back once its time is up; True when it came back."""
        if self.ejected and now >= self.ejected_until:
            self.ejected = False
            return True
        return False

    cpdef void end_interval(self):
        """Interval boundary: forget the interval's counts; a healthy endpoint that was
        ejected before slowly earns back a shorter next ejection."""
        if not self.ejected and self.times_ejected > 0 and self.failures == 0:
            self.times_ejected -= 1
        self.successes = 0
        self.failures = 0
