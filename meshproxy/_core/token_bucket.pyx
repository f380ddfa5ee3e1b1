"""Token buckets shared by every worker process: GCRA over int64 cells in shared memory.

Why GCRA (the generic cell rate algorithm, RFC 2475's "virtual scheduling"): a token bucket
of capacity B refilled at rate r is equivalent to one number per bucket, the theoretical
arrival time TAT. With T = 1/r (the emission interval) and tau = B * T, a request at time t
conforms when max(TAT, t) + T - t <= tau, and then TAT becomes max(TAT, t) + T. One number
means one compare-and-swap per request, so the workers of a pool update the same bucket
without a lock and the configured rate holds for the pool as a whole, exactly, whichever
worker each connection landed on. A TAT at or before `now` is a full bucket (the initial
zero too).

Keyed buckets (a header's value, a principal, a client address) live in an open-addressed
table of `nkeys` slots of two cells, [key hash, TAT], probed linearly up to PROBES slots.
A free slot (hash 0) is claimed by CAS; a slot whose bucket is full again (TAT <= now) holds
no state worth keeping and may be taken over by another key. When all probed slots are
busy, the request shares its home slot's bucket: more keys than `max_keys` active at once
are limited together rather than not at all.

Time is CLOCK_MONOTONIC in nanoseconds, the same clock in every process of the machine.
"""

from libc.stdint cimport int64_t, uint64_t
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

cdef extern from *:
    """
    #include <stdint.h>
    static inline int64_t mp_load64(int64_t *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline int mp_cas64(int64_t *p, int64_t expected, int64_t desired) {
        return __atomic_compare_exchange_n(p, &expected, desired, 0,
                                           __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    }
    """
    int64_t mp_load64(int64_t *p) nogil
    bint mp_cas64(int64_t *p, int64_t expected, int64_t desired) nogil

# Slots looked at for a key before sharing: short probes keep a miss cheap.
cdef enum:
    PROBES = 8


cdef inline int64_t monotonic_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


def now_ns():
    """The buckets' clock (CLOCK_MONOTONIC, nanoseconds)."""
    return monotonic_ns()


def cells_needed(Py_ssize_t nkeys):
    """int64 cells a table of `nkeys` buckets occupies."""
    return 2 * nkeys


cdef class TokenBuckets:
    def __init__(self, buf, Py_ssize_t offset_cells, Py_ssize_t nkeys, int64_t max_tokens,
                 double tokens_per_second):
        cdef unsigned char[::1] view = buf
        if nkeys < 1 or max_tokens < 1 or tokens_per_second <= 0:
            raise ValueError("nkeys, max_tokens and the rate must be positive")
        if offset_cells < 0 or (offset_cells + 2 * nkeys) * 8 > view.shape[0]:
            raise ValueError("bucket table outside the buffer")
        self._buf = buf
        self.cells = (<int64_t*>&view[0]) + offset_cells
        self.nkeys = nkeys
        self.max_tokens = max_tokens
        self.interval = <int64_t>(1e9 / tokens_per_second)
        if self.interval < 1:
            self.interval = 1
        self.tau = self.interval * max_tokens
        self.remaining = max_tokens
        self.reset = 0.0

    cdef int64_t* _slot(self, uint64_t key, int64_t now) noexcept:
        cdef uint64_t h
        cdef Py_ssize_t home, i, probe
        cdef int64_t *p
        cdef int64_t k
        if self.nkeys == 1:
            return self.cells
        h = key | 1  # never 0: 0 marks a free slot
        home = <Py_ssize_t>(h % <uint64_t>self.nkeys)
        for probe in range(PROBES):
            i = (home + probe) % self.nkeys
            p = self.cells + 2 * i
            k = mp_load64(p)
            if k == <int64_t>h:
                return p
            if k == 0:
                if mp_cas64(p, 0, <int64_t>h) or mp_load64(p) == <int64_t>h:
                    return p
            elif mp_load64(p + 1) <= now:
                if mp_cas64(p, k, <int64_t>h):
                    return p  # a full (idle) bucket carries no state: take it over
        return self.cells + 2 * home

    cpdef bint take(self, uint64_t key=0, int64_t now=-1):
        """One token for `key`; False when the bucket is empty. Sets `remaining` (tokens
        left) and `reset` (seconds until the bucket is full again, or, when refused, until
        the next token)."""
        cdef int64_t *tat_p
        cdef int64_t tat, base, new
        if now < 0:
            now = monotonic_ns()
        tat_p = self._slot(key, now) + 1
        while True:
            tat = mp_load64(tat_p)
            base = tat if tat > now else now
            new = base + self.interval
            if new - now > self.tau:
                self.remaining = 0
                self.reset = (new - self.tau - now) / 1e9
                return False
            if mp_cas64(tat_p, tat, new):
                self.remaining = (self.tau - (new - now)) // self.interval
                self.reset = (new - now) / 1e9
                return True
