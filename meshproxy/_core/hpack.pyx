"""HPACK (RFC 7541), compiled: the header compression of HTTP/2, sans-IO.

The first piece of a compiled HTTP/2 codec. Today it replaces the pure-Python `hpack`
package under the h2 library (protocol.http2 installs an Encoder and a Decoder on every
connection), with the same interface h2 uses and the same exceptions, so h2's own
handling of a bad block (COMPRESSION_ERROR, the HPACK-bomb guard) is unchanged.

Decoding (section 6), with the checks a decoder must make; a field sent never-indexed
(6.2.3) comes out as hpack's NeverIndexedHeaderTuple (a tuple), so that the proxy keeps it
so when it encodes the field again (7.1.3), every other as a plain tuple:
- an index of 0, or past the static and dynamic tables, is an error (2.3.3, 6.1);
- a dynamic table size update is allowed only at the start of a block (4.2) and never
  past the size our SETTINGS_HEADER_TABLE_SIZE allows (6.3);
- integers are bounded (5.1: an implementation limits them; 2^28 is far past any table
  or string we accept);
- a Huffman string (5.2) must not contain EOS, and its padding must be fewer than 8 bits,
  all ones;
- the decoded list's size (name + value + 32 each, 4.1) is bounded by
  max_header_list_size: past it the block is refused as it decodes (the HPACK bomb),
  not after.

Encoding indexes what it can (a full match as an indexed field, a known name as a literal
with the name's index) and adds fields to the dynamic table, except the sensitive ones,
sent as never-indexed literals (7.1.3) so that they stay out of every compression
context on the way: those marked so (hpack's NeverIndexedHeaderTuple), `authorization`
and `proxy-authorization`, and cookies under 20 bytes (the rules of nghttp2 and Firefox,
which h2's outbound normalization applied before this encoder took it over); strings are
Huffman coded when that is shorter. A change of the peer's table size is said at the start of the
next block (4.2).

The tables (Appendix A's static table, Appendix B's Huffman code) are read once from the
`hpack` package h2 depends on, where they are data from the RFC.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from hpack.exceptions import (
    HPACKDecodingError,
    InvalidTableIndex,
    InvalidTableSizeError,
    OversizedHeaderListError,
)
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.struct import NeverIndexedHeaderTuple
from hpack.table import HeaderTable

cdef enum:
    # RFC 7541 4.1: an entry's size is its name and value plus 32 octets of overhead.
    ENTRY_OVERHEAD = 32
    # The bound on a decoded integer (5.1): above any size or index we accept.
    MAX_INTEGER = 1 << 28
    EOS = 256

# Never indexed whatever their value (7.1.3).
cdef frozenset SENSITIVE = frozenset((b"authorization", b"proxy-authorization"))

cdef tuple STATIC = tuple((bytes(n), bytes(v)) for n, v in HeaderTable.STATIC_TABLE)
cdef Py_ssize_t STATIC_LEN = len(STATIC)  # 61
cdef dict STATIC_FULL = {}
cdef dict STATIC_NAME = {}
for _i, _entry in enumerate(STATIC):
    STATIC_FULL.setdefault(_entry, _i + 1)
    STATIC_NAME.setdefault(_entry[0], _i + 1)

# Huffman codes (Appendix B), and the decoding tree built from them: node 0 is the root;
# _child[2 * node + bit] is the next node, or -(symbol + 1) at a leaf, or 0 (no code).
cdef uint32_t _code[257]
cdef uint8_t _code_len[257]
cdef int _child[2 * 512]
cdef int _nodes = 1


cdef void _build_tree():
    global _nodes
    cdef int sym, i, node, bit, nxt
    for i in range(2 * 512):
        _child[i] = 0
    for sym in range(257):
        _code[sym] = REQUEST_CODES[sym]
        _code_len[sym] = REQUEST_CODES_LENGTH[sym]
        node = 0
        for i in range(_code_len[sym] - 1, -1, -1):
            bit = (_code[sym] >> i) & 1
            if i == 0:
                _child[2 * node + bit] = -(sym + 1)
            else:
                nxt = _child[2 * node + bit]
                if nxt == 0:
                    nxt = _nodes
                    _nodes += 1
                    _child[2 * node + bit] = nxt
                node = nxt


_build_tree()


cdef bytes _huffman_decode(const uint8_t* p, Py_ssize_t n):
    """RFC 7541 5.2: the symbols, or HPACKDecodingError (EOS inside, bad padding)."""
    cdef bytearray out = bytearray(n * 8 // 5 + 1)  # the shortest code is 5 bits
    cdef uint8_t* o = out
    cdef Py_ssize_t k = 0, i
    cdef int node = 0, bit, nxt, pad_bits = 0, b
    cdef bint ones = True
    for i in range(n):
        b = p[i]
        for bit in range(7, -1, -1):
            nxt = _child[2 * node + ((b >> bit) & 1)]
            if nxt < 0:
                if nxt == -(EOS + 1):
                    raise HPACKDecodingError("EOS in a Huffman-coded string")
                o[k] = <uint8_t>(-nxt - 1)
                k += 1
                node = 0
                pad_bits = 0
                ones = True
            elif nxt == 0:
                raise HPACKDecodingError("invalid Huffman code")
            else:
                node = nxt
                pad_bits += 1
                if not ((b >> bit) & 1):
                    ones = False
    if node != 0 and (pad_bits > 7 or not ones):
        raise HPACKDecodingError("invalid Huffman padding")
    return bytes(out[:k])


cdef bytes _huffman_encode(bytes s):
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(s)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(s), i, total = 0, k = 0
    cdef uint64_t acc = 0
    cdef int bits = 0, ln
    for i in range(n):
        total += _code_len[p[i]]
    cdef bytearray out = bytearray((total + 7) // 8)
    cdef uint8_t* o = out
    for i in range(n):
        ln = _code_len[p[i]]
        acc = (acc << ln) | _code[p[i]]
        bits += ln
        while bits >= 8:
            bits -= 8
            o[k] = <uint8_t>(acc >> bits)
            k += 1
    if bits:
        # Padding: the most significant bits of EOS, all ones (5.2).
        o[k] = <uint8_t>((acc << (8 - bits)) | ((1 << (8 - bits)) - 1))
    return bytes(out)


cdef Py_ssize_t _huffman_length(bytes s):
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(s)
    cdef Py_ssize_t i, total = 0
    for i in range(PyBytes_GET_SIZE(s)):
        total += _code_len[p[i]]
    return (total + 7) // 8


cdef inline void _integer(bytearray out, uint8_t first, int prefix, Py_ssize_t value):
    """5.1: `value` in a `prefix`-bit prefix, the representation's flags in `first`."""
    cdef Py_ssize_t limit = (1 << prefix) - 1
    if value < limit:
        out.append(first | <uint8_t>value)
        return
    out.append(first | <uint8_t>limit)
    value -= limit
    while value >= 128:
        out.append(<uint8_t>((value & 0x7F) | 0x80))
        value >>= 7
    out.append(<uint8_t>value)


cdef inline void _string(bytearray out, bytes s):
    cdef Py_ssize_t n = PyBytes_GET_SIZE(s)
    cdef Py_ssize_t h
    if n > 3:
        h = _huffman_length(s)
        if h < n:
            _integer(out, 0x80, 7, h)
            out += _huffman_encode(s)
            return
    _integer(out, 0, 7, n)
    out += s


cdef class _Table:
    """The dynamic table (2.3.2): newest last in `entries`; index 62 is the newest."""

    def __cinit__(self):
        self.entries = []
        self.size = 0
        self.maxsize = 4096

    cdef object get(self, Py_ssize_t index):
        """A 1-based index over the static then the dynamic table, or None."""
        cdef Py_ssize_t n
        if index <= 0:
            return None
        if index <= STATIC_LEN:
            return STATIC[index - 1]
        n = len(self.entries)
        index -= STATIC_LEN
        if index > n:
            return None
        return self.entries[n - index]

    cdef list add(self, bytes name, bytes value):
        """Add an entry, evicting the oldest ones (4.4); what was evicted."""
        cdef Py_ssize_t sz = PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + ENTRY_OVERHEAD
        cdef list evicted = []
        if sz > self.maxsize:
            # 4.4: an entry larger than the table empties it and is not added.
            evicted = self.entries
            self.entries = []
            self.size = 0
            return evicted
        while self.size + sz > self.maxsize:
            evicted.append(self._pop())
        self.entries.append((name, value))
        self.size += sz
        return evicted

    cdef tuple _pop(self):
        cdef tuple old = self.entries.pop(0)
        self.size -= PyBytes_GET_SIZE(old[0]) + PyBytes_GET_SIZE(old[1]) + ENTRY_OVERHEAD
        return old

    cdef list resize(self, Py_ssize_t maxsize):
        cdef list evicted = []
        self.maxsize = maxsize
        while self.size > maxsize:
            evicted.append(self._pop())
        return evicted


cdef class Decoder:
    """h2's decoder: decode(block, raw=True) -> [(name, value), ...]."""

    def __cinit__(self, Py_ssize_t max_header_list_size=65536):
        self.table = _Table()
        self.max_header_list_size = max_header_list_size
        self.max_allowed_table_size = 4096

    @property
    def header_table_size(self) -> int:
        return self.table.maxsize

    @header_table_size.setter
    def header_table_size(self, Py_ssize_t value):
        self.table.resize(value)

    def decode(self, data, bint raw=True) -> list:
        cdef bytes block = bytes(data)
        cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(block)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(block), pos = 0, index, total = 0
        cdef uint8_t b
        cdef bint fields_seen = False, indexing
        cdef list out = []
        cdef object entry
        cdef bytes name, value
        cdef _Table table = self.table
        while pos < n:
            b = p[pos]
            if b & 0x80:  # 6.1 indexed field
                index = _read_int(p, n, &pos, 7)
                entry = table.get(index)
                if entry is None:
                    raise InvalidTableIndex(f"invalid table index {index}")
                name, value = entry
            elif (b & 0xE0) == 0x20:  # 6.3 dynamic table size update
                if fields_seen:
                    raise HPACKDecodingError(
                        "dynamic table size update after a header field (RFC 7541 4.2)")
                index = _read_int(p, n, &pos, 5)
                if index > self.max_allowed_table_size:
                    raise InvalidTableSizeError(
                        f"table size {index} above the allowed {self.max_allowed_table_size}")
                table.resize(index)
                continue
            else:
                # 6.2.1 with incremental indexing (01), 6.2.2 without (0000), 6.2.3 never
                # indexed (0001).
                indexing = (b & 0xC0) == 0x40
                index = _read_int(p, n, &pos, 6 if indexing else 4)
                if index:
                    entry = table.get(index)
                    if entry is None:
                        raise InvalidTableIndex(f"invalid table index {index}")
                    name = entry[0]
                else:
                    name = _read_string(p, n, &pos)
                value = _read_string(p, n, &pos)
                if indexing:
                    table.add(name, value)
            fields_seen = True
            total += PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + ENTRY_OVERHEAD
            if total > self.max_header_list_size:
                raise OversizedHeaderListError(
                    f"a header list larger than {self.max_header_list_size}")
            if (b & 0xF0) == 0x10:
                # Never indexed (6.2.3): said so to whoever encodes it next (an intermediary
                # MUST keep it never indexed, 7.1.3), as hpack's NeverIndexedHeaderTuple.
                out.append(NeverIndexedHeaderTuple(name, value))
            else:
                out.append((name, value))
        return out


cdef Py_ssize_t _read_int(const uint8_t* p, Py_ssize_t n, Py_ssize_t* pos, int prefix) except -1:
    cdef Py_ssize_t limit = (1 << prefix) - 1
    cdef Py_ssize_t value = p[pos[0]] & limit
    cdef int shift = 0
    cdef uint8_t b
    pos[0] += 1
    if value < limit:
        return value
    while True:
        if pos[0] >= n:
            raise HPACKDecodingError("truncated integer")
        b = p[pos[0]]
        pos[0] += 1
        value += (<Py_ssize_t>(b & 0x7F)) << shift
        shift += 7
        if value > MAX_INTEGER or shift > 28:
            raise HPACKDecodingError("integer too large")
        if not (b & 0x80):
            return value


cdef bytes _read_string(const uint8_t* p, Py_ssize_t n, Py_ssize_t* pos):
    if pos[0] >= n:
        raise HPACKDecodingError("truncated string")
    cdef bint huffman = p[pos[0]] & 0x80
    cdef Py_ssize_t length = _read_int(p, n, pos, 7)
    cdef Py_ssize_t start = pos[0]
    if length > n - start:
        raise HPACKDecodingError("string past the end of the block")
    pos[0] = start + length
    if huffman:
        return _huffman_decode(p + start, length)
    return PyBytes_FromStringAndSize(<const char*>(p + start), length)


cdef class Encoder:
    """h2's encoder: encode(headers) -> bytes; header_table_size follows the peer's
    SETTINGS_HEADER_TABLE_SIZE. Its state: the table; `inserted`, the entries ever
    added (their sequence numbers); `full` and `names`, the newest entry's sequence
    number for a (name, value) and for a name; `sequence`, the table's entries' numbers
    oldest first; a size change not yet said (`pending_min`, `pending_final`)."""

    def __cinit__(self):
        self.table = _Table()
        self.inserted = 0
        self.full = {}
        self.names = {}
        self.sequence = []
        self.size_changed = False

    @property
    def header_table_size(self) -> int:
        return self.table.maxsize

    @header_table_size.setter
    def header_table_size(self, Py_ssize_t value):
        # Every size the table passes through before the next block is said then, the
        # smallest first (4.2: the decoder must see it shrink before it grows). The same
        # size again (the peer's first SETTINGS restating 4,096) changes nothing.
        if value == self.table.maxsize and not self.size_changed:
            return
        if not self.size_changed:
            self.size_changed = True
            self.pending_min = value
        elif value < self.pending_min:
            self.pending_min = value
        self.pending_final = value
        self._forget(self.table.resize(value))

    cdef void _forget(self, list evicted):
        cdef tuple old
        cdef Py_ssize_t seq
        for old in evicted:
            seq = self.sequence.pop(0)
            if self.full.get(old) == seq:
                del self.full[old]
            if self.names.get(old[0]) == seq:
                del self.names[old[0]]

    cdef Py_ssize_t _dynamic_index(self, Py_ssize_t seq):
        return STATIC_LEN + 1 + self.inserted - seq  # the newest entry is 62 (2.3.3)

    def encode(self, headers, bint huffman=True) -> bytes:
        cdef bytearray out = bytearray()
        cdef object h, found
        cdef bytes name, value
        cdef bint indexable
        cdef Py_ssize_t index, seq
        cdef tuple key
        if self.size_changed:
            self.size_changed = False
            if self.pending_min < self.pending_final:
                _integer(out, 0x20, 5, self.pending_min)
            _integer(out, 0x20, 5, self.pending_final)
        for h in headers:
            name = h[0]
            value = h[1]
            indexable = type(h) is tuple or getattr(h, "indexable", True)
            if indexable and (name in SENSITIVE or (name == b"cookie"
                                                    and PyBytes_GET_SIZE(value) < 20)):
                indexable = False
            key = (name, value)
            if indexable:
                found = STATIC_FULL.get(key)
                if found is not None:
                    _integer(out, 0x80, 7, found)
                    continue
                found = self.full.get(key)
                if found is not None:
                    _integer(out, 0x80, 7, self._dynamic_index(found))
                    continue
            found = STATIC_NAME.get(name)
            if found is None:
                found = self.names.get(name)
                if found is not None:
                    found = self._dynamic_index(found)
            index = 0 if found is None else found
            if indexable:
                _integer(out, 0x40, 6, index)
            else:
                _integer(out, 0x10, 4, index)  # never indexed (6.2.3)
            if not index:
                _string(out, name)
            _string(out, value)
            if indexable:
                self._forget(self.table.add(name, value))
                if PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + ENTRY_OVERHEAD \
                        <= self.table.maxsize:
                    self.inserted += 1
                    seq = self.inserted
                    self.sequence.append(seq)
                    self.full[key] = seq
                    self.names[name] = seq
        return bytes(out)
