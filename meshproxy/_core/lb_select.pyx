# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Endpoint selection, sans-IO: indices and numbers in, an index out.

Every balancer answers `pick(hash_key, attempt)`; `hash_key` matters only to the
consistent-hashing ones (0 means "no key": a random point), `attempt` > 0 asks for an
alternative (another point on the ring) when the first pick was unusable. Balancers that
look at load get `start(i)` / `finish(i, rtt, now)` around each request.

- SmoothWeightedRoundRobin (round_robin): nginx's algorithm, the sequence Envoy's weighted
  round robin converges to; over any `total` picks each endpoint is chosen exactly
  `weight` times, spread out (weights 5,1,1 give a a b a c a a).
- LeastRequest (least_request): power of two choices (Envoy's choice_count 2): draw two,
  keep the one with fewer requests in progress; with unequal weights, the higher
  weight / (active + 1) (Envoy's active_request_bias 1.0).
- Random (random).
- RingHash (ring_hash): each endpoint owns min_ring_size points on a 64-bit ring per unit
  of weight (Envoy's minimum_ring_size, 1024), placed by its own name only; a key goes to
  the next point clockwise, so adding one of N endpoints moves about 1/N of the keys, all
  to the new endpoint, and none between the others.
- Maglev (maglev): Google's Maglev table (prime size, Envoy's 65537): each endpoint fills
  slots by its own permutation (offset, skip) in turn, weighted; even spread, about 1/N
  of keys move when an endpoint is added, O(1) lookup.
- PeakEwma (peak_ewma, Linkerd's): cost = latency EWMA x (active + 1), the latency estimate
  jumping up at once on a slow response and decaying with time constant `decay`; power of
  two choices on cost.

Hashes are 64-bit FNV-1a with a splitmix64 finalizer (good spread for short keys).
Size: just past 400 lines, six balancers behind one interface, each about 60.
"""

from libc.math cimport exp
from libc.stdlib cimport free, malloc, qsort
from libc.string cimport memset
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE


cdef inline unsigned long long _mix(unsigned long long z) nogil:
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL
    return z ^ (z >> 31)


cpdef unsigned long long hash_bytes(bytes data):
    """64-bit hash of a key (never 0: 0 means 'no key')."""
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data), i
    cdef unsigned long long h = 0xcbf29ce484222325ULL
    for i in range(n):
        h = (h ^ p[i]) * 0x100000001b3ULL
    h = _mix(h)
    return h if h else 1


cdef class _Rng:
    """xorshift64*: fast draws for the random balancers (not for secrets)."""

    def __init__(self, unsigned long long seed):
        self.state = _mix(seed) | 1

    cdef inline unsigned long long next(self):
        cdef unsigned long long x = self.state
        x ^= x >> 12
        x ^= x << 25
        x ^= x >> 27
        self.state = x
        return x * 0x2545f4914f6cdd1dULL


cdef class Balancer:
    def __cinit__(self, list weights, *args, **kwargs):
        cdef Py_ssize_t n = len(weights), i
        if n == 0:
            raise ValueError("no endpoints to balance")
        self.n = n
        self.weights = <long *>malloc(n * sizeof(long))
        self.active = <long *>malloc(n * sizeof(long))
        if self.weights == NULL or self.active == NULL:
            raise MemoryError()
        self.total = 0
        self.uniform = True
        for i in range(n):
            w = weights[i]
            if w <= 0:
                raise ValueError("endpoint weights must be positive")
            self.weights[i] = w
            self.active[i] = 0
            self.total += w
            if w != weights[0]:
                self.uniform = False
        self.rng = _Rng(<unsigned long long>id(self) ^ <unsigned long long>n)

    def __dealloc__(self):
        free(self.weights)
        free(self.active)

    def __len__(self):
        return self.n

    cpdef Py_ssize_t pick(self, unsigned long long key=0, int attempt=0):
        """The default every policy refines: a draw in proportion to the weights."""
        return self._random_weighted()

    cpdef void start(self, Py_ssize_t i):
        self.active[i] += 1

    cpdef void finish(self, Py_ssize_t i, double rtt, double now):
        self.active[i] -= 1

    cdef Py_ssize_t _random_weighted(self):
        cdef long r
        cdef Py_ssize_t i
        if self.uniform:
            return <Py_ssize_t>(self.rng.next() % <unsigned long long>self.n)
        r = <long>(self.rng.next() % <unsigned long long>self.total)
        for i in range(self.n):
            r -= self.weights[i]
            if r < 0:
                return i
        return self.n - 1


cdef class SmoothWeightedRoundRobin(Balancer):
    def __init__(self, list weights):
        cdef Py_ssize_t i
        self.current = <long *>malloc(self.n * sizeof(long))
        if self.current == NULL:
            raise MemoryError()
        for i in range(self.n):
            self.current[i] = 0
        self.next_i = 0

    def __dealloc__(self):
        free(self.current)

    cpdef Py_ssize_t pick(self, unsigned long long key=0, int attempt=0):
        cdef Py_ssize_t i, best = 0
        cdef long best_score
        if self.uniform:
            i = self.next_i
            self.next_i = i + 1 if i + 1 < self.n else 0
            return i
        best_score = -1
        for i in range(self.n):
            self.current[i] += self.weights[i]
            if self.current[i] > best_score:
                best_score = self.current[i]
                best = i
        self.current[best] -= self.total
        return best


cdef class Random(Balancer):
    """A weighted random draw: the base balancer's pick, under its config name."""

    def __init__(self, list weights):
        pass


cdef class LeastRequest(Balancer):
    def __init__(self, list weights):
        pass

    cpdef Py_ssize_t pick(self, unsigned long long key=0, int attempt=0):
        cdef Py_ssize_t a, b
        if self.n == 1:
            return 0
        a = self._random_weighted()
        b = self._random_weighted()
        if self.uniform:
            return a if self.active[a] <= self.active[b] else b
        # Envoy: effective weight = weight / (active + 1) ** active_request_bias (1.0)
        if self.weights[a] * (self.active[b] + 1) >= self.weights[b] * (self.active[a] + 1):
            return a
        return b


cdef class PeakEwma(Balancer):
    """Linkerd's peak-EWMA: latency estimate per endpoint, costs compared by P2C."""

    def __init__(self, list weights, double decay=10.0, double default_rtt=0.001):
        cdef Py_ssize_t i
        self.decay = decay
        self.ewma = <double *>malloc(self.n * sizeof(double))
        self.stamp = <double *>malloc(self.n * sizeof(double))
        if self.ewma == NULL or self.stamp == NULL:
            raise MemoryError()
        for i in range(self.n):
            self.ewma[i] = default_rtt
            self.stamp[i] = 0.0

    def __dealloc__(self):
        free(self.ewma)
        free(self.stamp)

    cdef double _cost(self, Py_ssize_t i):
        return self.ewma[i] * (self.active[i] + 1) / self.weights[i]

    cpdef Py_ssize_t pick(self, unsigned long long key=0, int attempt=0):
        cdef Py_ssize_t a, b
        if self.n == 1:
            return 0
        a = <Py_ssize_t>(self.rng.next() % <unsigned long long>self.n)
        b = <Py_ssize_t>(self.rng.next() % <unsigned long long>(self.n - 1))
        if b >= a:
            b += 1
        return a if self._cost(a) <= self._cost(b) else b

    cpdef void finish(self, Py_ssize_t i, double rtt, double now):
        cdef double elapsed, w
        self.active[i] -= 1
        if rtt < 0:
            return
        if rtt > self.ewma[i]:
            self.ewma[i] = rtt  # the peak: a slow response counts at once
        else:
            elapsed = now - self.stamp[i]
            if elapsed < 0:
                elapsed = 0
            w = exp(-elapsed / self.decay)
            self.ewma[i] = self.ewma[i] * w + rtt * (1.0 - w)
        self.stamp[i] = now

    def estimate(self, Py_ssize_t i):
        return self.ewma[i]


ctypedef struct _Point:
    unsigned long long h
    Py_ssize_t owner


cdef int _cmp_points(const void *a, const void *b) noexcept nogil:
    cdef const _Point *x = <const _Point *>a
    cdef const _Point *y = <const _Point *>b
    if x.h != y.h:
        return -1 if x.h < y.h else 1
    # Equal hashes (as good as never on 64 bits): the order is still fixed.
    return -1 if x.owner < y.owner else (1 if x.owner > y.owner else 0)


cdef class RingHash(Balancer):
    """Consistent hashing on a ring of 64-bit points.

    Placement rule: endpoint e owns weight(e) x per_weight points, the k-th at
    splitmix64(hash(name) + k * golden ratio); `per_weight` is `min_ring_size` (Envoy's
    minimum_ring_size, 1024), so even one endpoint of weight 1 has that many points, unless
    the whole ring would pass `max_ring_size` (Envoy's maximum_ring_size, 8M), when it is
    shrunk to fit. An endpoint's points therefore depend only on its own name and weight:
    adding an endpoint of weight w to a total of W moves only the keys that now go to it,
    about w / (W + w) of them, and removing one moves only its own keys; no key ever moves
    between two endpoints that were there before and after. (Envoy scales every endpoint's
    share down as endpoints join, which also moves keys between old endpoints.)
    Cost: 16 bytes a point, 16 KiB per unit of weight at the default size.
    """

    def __init__(self, list weights, list names, Py_ssize_t min_ring_size=1024,
                 Py_ssize_t max_ring_size=8388608):
        cdef Py_ssize_t i, k, per, size = 0, at = 0
        cdef long long total_w = self.total
        cdef long long per_weight = min_ring_size
        cdef unsigned long long seed
        cdef _Point *pts
        if len(names) != self.n:
            raise ValueError("one name per endpoint")
        if min_ring_size < 1 or max_ring_size < 1:
            raise ValueError("ring sizes must be positive")
        if per_weight * total_w > max_ring_size:
            per_weight = max_ring_size // total_w if max_ring_size >= total_w else 1
        for i in range(self.n):
            size += per_weight * self.weights[i]
        self.size = size
        self.points = <unsigned long long *>malloc(size * sizeof(unsigned long long))
        self.owners = <Py_ssize_t *>malloc(size * sizeof(Py_ssize_t))
        pts = <_Point *>malloc(size * sizeof(_Point))
        if self.points == NULL or self.owners == NULL or pts == NULL:
            free(pts)
            raise MemoryError()
        for i in range(self.n):
            per = per_weight * self.weights[i]
            seed = hash_bytes(<bytes>names[i])
            for k in range(per):
                seed += 0x9e3779b97f4a7c15ULL
                pts[at].h = _mix(seed)
                pts[at].owner = i
                at += 1
        qsort(pts, size, sizeof(_Point), _cmp_points)
        for at in range(size):
            self.points[at] = pts[at].h
            self.owners[at] = pts[at].owner
        free(pts)

    def __dealloc__(self):
        free(self.points)
        free(self.owners)

    def __len__(self):
        return self.n

    @property
    def ring_size(self):
        return self.size

    cpdef Py_ssize_t pick(self, unsigned long long key=0, int attempt=0):
        cdef Py_ssize_t lo = 0, hi, mid
        if key == 0:
            key = self.rng.next()
        if attempt:
            key = _mix(key + <unsigned long long>attempt * 0x9e3779b97f4a7c15ULL)
        hi = self.size
        while lo < hi:  # first point >= key, wrapping around
            mid = (lo + hi) >> 1
            if self.points[mid] < key:
                lo = mid + 1
            else:
                hi = mid
        if lo == self.size:
            lo = 0
        return self.owners[lo]


cdef class Maglev(Balancer):
    def __init__(self, list weights, list names, Py_ssize_t table_size=65537):
        cdef Py_ssize_t i, filled = 0, m = table_size, slot
        cdef unsigned long long *offset
        cdef unsigned long long *skip
        cdef unsigned long long *nexts
        cdef double *credit
        cdef long max_w = 0
        cdef bytes name
        if len(names) != self.n:
            raise ValueError("one name per endpoint")
        self.size = m
        self.table = <Py_ssize_t *>malloc(m * sizeof(Py_ssize_t))
        offset = <unsigned long long *>malloc(self.n * sizeof(unsigned long long))
        skip = <unsigned long long *>malloc(self.n * sizeof(unsigned long long))
        nexts = <unsigned long long *>malloc(self.n * sizeof(unsigned long long))
        credit = <double *>malloc(self.n * sizeof(double))
        if self.table == NULL or offset == NULL or skip == NULL or nexts == NULL or credit == NULL:
            raise MemoryError()
        for i in range(m):
            self.table[i] = -1
        for i in range(self.n):
            name = names[i]
            offset[i] = hash_bytes(name + b"#offset") % <unsigned long long>m
            skip[i] = hash_bytes(name + b"#skip") % <unsigned long long>(m - 1) + 1
            nexts[i] = 0
            credit[i] = 0.0
            if self.weights[i] > max_w:
                max_w = self.weights[i]
        # Weighted population (Envoy's): each round an endpoint earns weight/max_weight of
        # a turn and takes a slot when it has a whole one.
        while filled < m:
            for i in range(self.n):
                credit[i] += <double>self.weights[i] / max_w
                if credit[i] < 1.0:
                    continue
                credit[i] -= 1.0
                while True:
                    slot = <Py_ssize_t>((offset[i] + nexts[i] * skip[i]) % <unsigned long long>m)
                    nexts[i] += 1
                    if self.table[slot] < 0:
                        break
                self.table[slot] = i
                filled += 1
                if filled == m:
                    break
        free(offset)
        free(skip)
        free(nexts)
        free(credit)

    def __dealloc__(self):
        free(self.table)

    @property
    def table_size(self):
        return self.size

    cpdef Py_ssize_t pick(self, unsigned long long key=0, int attempt=0):
        if key == 0:
            key = self.rng.next()
        if attempt:
            key = _mix(key + <unsigned long long>attempt * 0x9e3779b97f4a7c15ULL)
        return self.table[key % <unsigned long long>self.size]


def make(str policy, list weights, list names=None, **options):
    """A balancer by its config name."""
    if policy == "round_robin":
        return SmoothWeightedRoundRobin(weights)
    if policy == "least_request":
        return LeastRequest(weights)
    if policy == "random":
        return Random(weights)
    if policy == "ring_hash":
        return RingHash(weights, names, options.get("minimum_ring_size", 1024),
                        options.get("maximum_ring_size", 8388608))
    if policy == "maglev":
        return Maglev(weights, names, options.get("table_size", 65537))
    if policy == "peak_ewma":
        return PeakEwma(weights, options.get("decay", 10.0))
    raise ValueError(f"unknown lb_policy {policy!r}")
