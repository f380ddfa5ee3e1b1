# cython: language_level=3, boundscheck=False, wraparound=False
"""Endpoint selection, sans-IO: indices in, an index out.

Smooth weighted round robin (nginx's algorithm, the same sequence Envoy's weighted round
robin converges to): every pick adds each endpoint's weight to its running score, takes the
highest score and subtracts the total weight from it. Over any window of `total` picks each
endpoint is chosen exactly `weight` times, and picks of one endpoint are spread out rather
than bunched (weights 5,1,1 give a a b a c a a, not a a a a a b c).

Equal weights take a fast path: a rotating index, no per-pick loop.
"""

from libc.stdlib cimport malloc, free


cdef class SmoothWeightedRoundRobin:
    def __cinit__(self, list weights):
        cdef Py_ssize_t n = len(weights), i
        if n == 0:
            raise ValueError("no endpoints to balance")
        self.n = n
        self.weights = <long *>malloc(n * sizeof(long))
        self.current = <long *>malloc(n * sizeof(long))
        if self.weights == NULL or self.current == NULL:
            raise MemoryError()
        self.total = 0
        self.uniform = True
        for i in range(n):
            w = weights[i]
            if w <= 0:
                raise ValueError("endpoint weights must be positive")
            self.weights[i] = w
            self.current[i] = 0
            self.total += w
            if w != weights[0]:
                self.uniform = False
        self.next = 0

    def __dealloc__(self):
        free(self.weights)
        free(self.current)

    def __len__(self):
        return self.n

    cpdef Py_ssize_t pick(self):
        cdef Py_ssize_t i, best = 0
        cdef long best_score
        if self.uniform:
            i = self.next
            self.next = i + 1 if i + 1 < self.n else 0
            return i
        best_score = -1
        for i in range(self.n):
            self.current[i] += self.weights[i]
            if self.current[i] > best_score:
                best_score = self.current[i]
                best = i
        self.current[best] -= self.total
        return best

    cpdef Py_ssize_t pick_other(self, Py_ssize_t avoid):
        """A pick that is not `avoid` when another endpoint exists (for a second attempt)."""
        cdef Py_ssize_t i = self.pick()
        if i == avoid and self.n > 1:
            i = self.pick()
            if i == avoid:
                i = avoid + 1 if avoid + 1 < self.n else 0
        return i
