# cython: language_level=3, boundscheck=False, wraparound=False
"""Counter, gauge and histogram cells over a shared-memory buffer (sans-IO).

One `StatsBlock` is one worker's slab of the segment the supervisor created: int64 cells
that only that worker writes (single writer: no locks, no atomics beyond the aligned 8-byte
stores x86-64 makes atomic for the reader, no syscalls). The supervisor reads every slab
with `sum_cells` and adds them up. Offsets come from meshproxy.stats.names, where every
stat is declared once.

Histograms: cells[i .. i+nb] count values per bucket (bucket k holds values <= bounds[k],
the last holds the rest), then sum (microseconds) and count.
"""

from libc.string cimport memset

cdef double BOUNDS[32]
cdef int NBOUNDS = 0


def set_bounds(bounds):
    """Install the histogram bucket bounds (ms) shared by every histogram."""
    global NBOUNDS
    if len(bounds) > 32:
        raise ValueError("at most 32 histogram bounds")
    for k, b in enumerate(bounds):
        BOUNDS[k] = b
    NBOUNDS = len(bounds)


cdef class StatsBlock:
    def __init__(self, buffer, Py_ssize_t first_cell, Py_ssize_t ncells):
        cdef long long[::1] view = memoryview(buffer).cast("B").cast("q")
        if first_cell < 0 or first_cell + ncells > view.shape[0]:
            raise ValueError("slab outside the segment")
        self._view = view
        self.cells = &view[first_cell]
        self.ncells = ncells

    cpdef void inc(self, Py_ssize_t i):
        self.cells[i] += 1

    cpdef void add(self, Py_ssize_t i, long long n):
        self.cells[i] += n

    cpdef void set(self, Py_ssize_t i, long long v):
        self.cells[i] = v

    cpdef long long get(self, Py_ssize_t i):
        return self.cells[i]

    cpdef void observe(self, Py_ssize_t i, double ms):
        """Record one value (milliseconds) in the histogram starting at cell i."""
        cdef int k = 0
        while k < NBOUNDS and ms > BOUNDS[k]:
            k += 1
        self.cells[i + k] += 1
        self.cells[i + NBOUNDS + 1] += <long long>(ms * 1000.0)
        self.cells[i + NBOUNDS + 2] += 1

    def zero(self):
        memset(self.cells, 0, self.ncells * sizeof(long long))


cdef class NullStatsBlock(StatsBlock):
    """A block that records nothing: `--no-stats`, and the baseline that shows what stats
    cost. Reads return 0."""

    cpdef void inc(self, Py_ssize_t i):
        pass

    cpdef void add(self, Py_ssize_t i, long long n):
        pass

    cpdef void set(self, Py_ssize_t i, long long v):
        pass

    cpdef long long get(self, Py_ssize_t i):
        return 0

    cpdef void observe(self, Py_ssize_t i, double ms):
        pass


def sum_cells(buffer, Py_ssize_t slab_cells, list slabs, Py_ssize_t first, Py_ssize_t count):
    """Per cell, the sum over the given slabs of cells [first, first+count)."""
    cdef long long[::1] view = memoryview(buffer).cast("B").cast("q")
    cdef Py_ssize_t k, s, base
    cdef list out = [0] * count
    cdef long long acc
    for k in range(count):
        acc = 0
        for s in slabs:
            base = s * slab_cells
            acc += view[base + first + k]
        out[k] = acc
    return out


def fold(buffer, Py_ssize_t slab_cells, Py_ssize_t src, Py_ssize_t dst, bytes gauge_mask,
         bytes ends_as=None):
    """Add slab `src` into slab `dst` except gauge cells (mask byte 1), then zero `src`.

    Used when a worker is replaced: its counters and histograms survive in the retired
    slab, so totals never go backwards; its gauges die with its connections. `ends_as`
    (int64 per cell, -1 for none) names, for a gauge of things in progress, the counter
    that counts them as ended: a positive value there is added to that counter in `dst`."""
    cdef long long[::1] view = memoryview(buffer).cast("B").cast("q")
    cdef const unsigned char[::1] mask = gauge_mask
    cdef const long long[::1] ends
    cdef Py_ssize_t k, a = src * slab_cells, b = dst * slab_cells
    cdef long long target
    if mask.shape[0] != slab_cells:
        raise ValueError("mask does not match the slab")
    if ends_as is not None:
        ends = memoryview(ends_as).cast("q")
        if ends.shape[0] != slab_cells:
            raise ValueError("ends_as does not match the slab")
        for k in range(slab_cells):
            target = ends[k]
            if mask[k] and target >= 0 and view[a + k] > 0:
                view[b + target] += view[a + k]
    for k in range(slab_cells):
        if not mask[k]:
            view[b + k] += view[a + k]
        view[a + k] = 0
