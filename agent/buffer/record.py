"""The stored record format (buffer format 3): one poll of one device, columnar, checked.

A record is two parts:

*Tag dictionary* — what stays the same from poll to poll: the device name, the tag names
and units in sample order, and the kind of value each tag had when the dictionary was
made. The durable buffer keeps each dictionary once, in a table of its own (a new one is
made when a device's tags or units change, i.e. when its configuration does); a record
refers to it. Layout::

    b"D3" | u32 json_len | json [device, [tag, ...], [unit | null, ...]]
          | u32 n | n bytes of value kinds | u32 crc32 (of everything before it)

*Body* — the poll itself. Layout (integers little-endian)::

    b"R3" | u8 flags | u8 sections | u32 dictionary crc32 | i64 first_seq | i64 last_seq
          | u32 count | u32 payload_len | payload | u32 crc32 (of everything before it)

``flags``: bits 0-1 the payload's compression (0 none, 1 zlib), bit 2 a JSON body (the
payload is the JSON array of the samples, as in format 2: used for batches the columnar
form cannot carry exactly — samples of several devices, extra keys, ints beyond 64 bits —
so that they are stored, or refused, exactly as before). The columnar payload holds, in
this order, only the sections whose bit is set in ``sections``:

- seqs, when they are not ``first_seq .. last_seq`` one by one: ``seq - first_seq`` per sample;
- tag indices into the dictionary, when the record does not hold its tags in its order;
- the value kinds, when they differ from the dictionary's;
- ``ts_agent``: one JSON value for the whole record, or (bit set) a table of the distinct
  values and an index per sample;
- ``ts_source`` (bit set when any sample has one): a table of the distinct values
  (``null`` included) and an index per sample, so each one survives exactly;
- the samples that are not good (quality other than ``good``, or a reason or a code):
  JSON ``[[index, quality, reason, code], ...]``; every other sample is good with no
  reason and no code;
- ``value_text`` where a sample has one: JSON ``[[index, text], ...]``;
- the values, by kind (none, bool, int, float, str, other): bools one byte each, ints as an
  array of the narrowest width that holds them all (u8 … i64/u64), floats as float32 when
  every one of them survives the round trip bit for bit, else float64 (int and float
  arrays as byte planes: all first bytes, then all second bytes...), strings as UTF-8
  with their lengths, anything else (lists) as JSON. A NaN or ±Infinity is stored as none:
  format 2 stored it as JSON ``null`` too, so a reader sees exactly what it saw before.

Integer arrays (``ints``) are a type code (``b B h H i I q Q``) and the array's bytes. The
payload is compressed with zlib (level 1) when it is at least 512 bytes and that saves at
least a quarter of it.

A record's *data*, as `take` returns it and as every reader gets it, is self-contained:
dictionary + body (or a JSON body alone, or, for records written by format 2, the JSON
array of samples itself). `record_samples` and `record_columns` read all three.

The API:

- `RecordEncoder(compression="zlib").encode(samples, last_seq) -> EncodedBatch`: what the
  buffers call (``first_seq``, ``last_seq``, ``count``, ``data`` = the body stored and
  counted, ``dictionary`` = its blob, ``full`` = both); it keeps each device's current
  dictionary. `encode_samples(samples) -> bytes`: a self-contained record of decoded
  samples (the forwarder's split).
- `agent.buffer.common.record_samples(data)` — one dict per sample in the format-2 shape,
  for any record — stays the one decode entry point; `record_json(data)` the same as a
  JSON array. `record_columns(data) -> RecordColumns`: the cheap view for encoders that
  work by columns (names, units, values, seqs, ts_agent, ts_source, the not-good samples
  and value_text by index; no dict per value); `columns_of_samples` makes the same view
  of a format-2 record, `samples_of_columns` turns a view into dicts.
- `check_body(body) -> BodyHeader`, `check_dictionary(blob) -> Dictionary`,
  `join(dictionary, body)`, `split_record(data)`, `is_body(data)`, `is_record(data)`:
  what the store and the salvage use. Every failed check raises `CorruptRecord`, a
  ValueError.

Every body and every dictionary carries a CRC32, and a body names the CRC of its
dictionary: a flipped bit anywhere (in the body, in the dictionary, or in the row's link
between them) is detected by `check_body` / `check_dictionary`, which the buffer runs at
every `take` and the salvage runs on every row, and never decodes into wrong samples.
"""

from __future__ import annotations

import contextlib
import math
import struct
import sys
import zlib
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import compress, repeat
from operator import is_, is_not, itemgetter, ne, or_
from typing import Any, Literal, cast

import orjson

from agent.samples import PollSamples
from agent.schema import SAMPLE_FIELDS, WireSample

Compression = Literal["none", "zlib"]

DICT_MAGIC = b"D3"
BODY_MAGIC = b"R3"
_DICT_HEAD = struct.Struct("<2sI")
_BODY_HEAD = struct.Struct("<2sBBIqqII")
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_CRC = 4

_COMP_NONE = 0
_COMP_ZLIB = 1
_JSON_BODY = 4

_S_SEQ = 1
_S_INDEX = 2
_S_KINDS = 4
_S_TS_AGENT_TABLE = 8
_S_TS_SOURCE = 16
_S_NOT_GOOD = 32
_S_VALUE_TEXT = 64

# Value kinds.
_NONE, _BOOL, _INT, _FLOAT, _STR, _OTHER = range(6)
_KIND_OF: dict[type, int] = {type(None): _NONE, bool: _BOOL, int: _INT, float: _FLOAT, str: _STR}

_ORJSON_OPTS = orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC
_FIELDS = SAMPLE_FIELDS
_ROW = itemgetter(*_FIELDS)
_NFIELDS = len(_FIELDS)
_BIG = sys.byteorder == "big"
#: zlib pays when it saves at least this share of the payload (less is not worth the
#: inflate at every take: see bench/README.md, "Record format").
_ZLIB_MIN_SAVING = 1 / 4
_ZLIB_LEVEL = 1
#: Smaller payloads are not worth trying (bench/README.md: a 10-tag poll gains nothing).
_ZLIB_MIN_BYTES = 512
#: Dictionaries kept by an encoder (one per device); beyond it the cache starts again.
_ENCODER_DEVICES = 4096
_DECODED_DICTS = 256


class CorruptRecord(ValueError):
    """A record or dictionary that fails its checks (checksum, layout, lengths)."""


@dataclass(frozen=True, slots=True)
class Dictionary:
    """A decoded tag dictionary."""

    device: str
    tags: tuple[str, ...]
    units: tuple[str | None, ...]
    kinds: bytes
    crc: int
    blob: bytes


@dataclass(frozen=True, slots=True)
class BodyHeader:
    """What `check_body` read from a body's header."""

    first_seq: int
    last_seq: int
    count: int
    dict_crc: int  # 0 for a JSON body
    json: bool


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """One encoded batch: `data` is the body the buffer stores (and counts against
    max_bytes), `dictionary` the blob of its tag dictionary (b"" for a JSON body)."""

    first_seq: int
    last_seq: int
    count: int
    data: bytes
    dictionary: bytes = b""

    @property
    def full(self) -> bytes:
        """The self-contained record (dictionary + body), as readers get it."""
        return self.dictionary + self.data


@dataclass(frozen=True, slots=True)
class RecordColumns:
    """A record by columns (see `record_columns`): one list per field instead of one dict
    per sample. Index i of every sequence is the i-th sample, in seq order."""

    device: str
    tags: Sequence[str]
    units: Sequence[str | None]
    values: Sequence[Any]
    seqs: Sequence[int]  # a range when the seqs are consecutive
    #: ts_agent of every sample, as the JSON value (an ISO 8601 string) format 2 stored.
    ts_agent: Sequence[Any]
    #: The one ts_agent of the whole record, or None when the samples differ.
    ts_agent_single: Any
    ts_source: Sequence[Any] | None  # None when no sample has one
    #: index → (quality, reason, code) for the samples that are not good; every other
    #: sample is ("good", None, None).
    not_good: dict[int, tuple[Any, Any, Any]]
    value_text: dict[int, Any]  # index → value_text, where a sample has one

    def __len__(self) -> int:
        return len(self.values)

    def quality(self, i: int) -> Any:
        bad = self.not_good.get(i)
        return "good" if bad is None else bad[0]

    def sample(self, i: int) -> dict[str, Any]:
        """Sample i as a dict, as `samples_of_columns` makes it."""
        quality, reason, code = self.not_good.get(i, ("good", None, None))
        out = {
            "device": self.device,
            "tag": self.tags[i],
            "value": self.values[i],
            "quality": quality,
            "reason": reason,
            "code": code,
            "ts_source": self.ts_source[i] if self.ts_source is not None else None,
            "ts_agent": self.ts_agent[i],
            "unit": self.units[i],
            "seq": self.seqs[i],
        }
        if i in self.value_text:
            out["value_text"] = self.value_text[i]
        return out


# ---------------------------------------------------------------------- encoding


class _Fallback(Exception):
    """The columnar form cannot carry this batch exactly: store it as JSON."""


@dataclass(slots=True)
class _DeviceDict:
    tags: list[str]
    units: list[str | None]
    index: dict[str, int]
    kinds: bytes
    crc: int
    blob: bytes


class RecordEncoder:
    """Encodes batches; keeps the current tag dictionary of each device, so that a poll
    with the same tags as the previous one costs one list comparison, not a dictionary.

    `compression`: ``zlib`` (the default: level 1, kept only where it saves at least a
    quarter) or ``none``."""

    def __init__(self, compression: Compression = "zlib") -> None:
        self._compression = compression
        self._dicts: dict[str, _DeviceDict] = {}

    def encode(self, samples: Sequence[WireSample], last_seq: int) -> EncodedBatch:
        """Check the seqs of a batch and encode it.

        Raises ValueError when the batch is empty, or when seqs are not strictly
        increasing or not above `last_seq` (a programming error in the caller: seqs are
        allocated once per agent and never reused), and orjson.JSONEncodeError (a
        TypeError) for a value format 2 could not store either."""
        if not samples:
            raise ValueError("empty batch: append at least one sample")
        n = len(samples)
        try:
            if type(samples) is PollSamples:
                payload, sections, ddict, first, last = self._poll_columns(samples, last_seq)
            else:
                payload, sections, ddict, first, last = self._columns(samples, last_seq)
        except _Fallback:
            first, last, _ = check_seqs(samples, last_seq)
            body = orjson.dumps(list(samples), option=_ORJSON_OPTS)
            return EncodedBatch(first, last, n, _frame(body, _JSON_BODY, 0, 0, first, last, n))
        flags = _COMP_NONE
        if self._compression == "zlib" and len(payload) >= _ZLIB_MIN_BYTES:
            packed = zlib.compress(payload, _ZLIB_LEVEL)
            if len(packed) <= len(payload) * (1 - _ZLIB_MIN_SAVING):
                payload, flags = packed, _COMP_ZLIB
        data = _frame(payload, flags, sections, ddict.crc, first, last, n)
        return EncodedBatch(first, last, n, data, ddict.blob)

    def _dictionary(
        self, device: str, tags: list[str], units: list[str | None], kinds: bytes
    ) -> tuple[_DeviceDict, list[int] | None]:
        """The device's dictionary for these tags, and the tag indices when the record
        does not hold the dictionary's tags in its order (None when it does)."""
        cur = self._dicts.get(device)
        if cur is not None:
            if tags == cur.tags and units == cur.units:
                return cur, None
            get = cur.index.get
            found = list(map(get, tags))
            if None not in found:
                idx = cast(list[int], found)
                ctags, cunits = cur.tags, cur.units
                if [ctags[i] for i in idx] == tags and [cunits[i] for i in idx] == units:
                    return cur, idx
        if len(set(tags)) != len(tags):
            raise _Fallback  # a tag twice in one poll: no index can tell them apart
        if not all(type(t) is str for t in tags) or not all(
            u is None or type(u) is str for u in units
        ):
            raise _Fallback
        if type(device) is not str:
            raise _Fallback
        blob = dictionary_blob(device, tags, units, kinds)
        new = _DeviceDict(
            list(tags),
            list(units),
            {t: i for i, t in enumerate(tags)},
            kinds,
            _U32.unpack_from(blob, len(blob) - _CRC)[0],
            blob,
        )
        if cur is None and len(self._dicts) >= _ENCODER_DEVICES:
            self._dicts.clear()
        self._dicts[device] = new
        return new, None

    def _poll_columns(
        self, poll: PollSamples, last_seq: int
    ) -> tuple[bytes, int, _DeviceDict, int, int]:
        """`_columns` of a poll that is already in columns (`agent.samples`): no dict per
        value and no walk over them; the same bytes as `_columns` of its items."""
        first = poll.first_seq
        if type(first) is not int or first <= last_seq:
            check_seqs(poll, last_seq)  # raises, naming the sample
        last = first + len(poll.values) - 1
        tags = poll.tags if type(poll.tags) is list else list(poll.tags)
        units = poll.units if type(poll.units) is list else list(poll.units)
        values, kinds, columns = _values(poll.values)
        ddict, idx = self._dictionary(poll.device, tags, units, kinds)
        parts: list[bytes] = []
        sections = 0
        sections |= _placement(parts, idx, kinds, ddict)
        one = orjson.dumps(poll.ts_agent, option=_ORJSON_OPTS)
        if len(one) < 1 << 16:
            parts.append(_U16.pack(len(one)) + one)
        else:
            sections |= _S_TS_AGENT_TABLE
            parts.append(_table([poll.ts_agent] * len(values)))
        bad = [[i, q, r, c] for i, (q, r, c) in sorted(poll.not_good.items())]
        texts = [[i, t] for i, t in sorted(poll.value_text.items())]
        sections |= _sparse(parts, bad, texts)
        parts.extend(columns)
        return b"".join(parts), sections, ddict, first, last

    def _columns(
        self, samples: Sequence[WireSample], last_seq: int
    ) -> tuple[bytes, int, _DeviceDict, int, int]:
        n = len(samples)
        value_text: list[list[Any]] = []
        if sum(map(len, samples)) != _NFIELDS * n:
            for i, s in enumerate(samples):
                if len(s) != _NFIELDS:
                    if len(s) != _NFIELDS + 1 or "value_text" not in s:
                        raise _Fallback
                    value_text.append([i, s["value_text"]])
        try:
            rows = list(map(_ROW, samples))
        except KeyError:
            raise _Fallback from None
        devices, tags, values, quality, reason, code, ts_source, ts_agent, units, seqs = (
            list(c) for c in zip(*rows, strict=True)
        )
        first = seqs[0]
        if (
            type(first) is int
            and first > last_seq
            and seqs == list(range(first, first + n))
            and set(map(type, seqs)) == {int}
        ):
            contiguous, last = True, first + n - 1
        else:
            first, last, contiguous = check_seqs(samples, last_seq)  # raises for bad seqs
        device = devices[0]
        if devices.count(device) != n:
            raise _Fallback
        values, kinds, columns = _values(values)
        ddict, idx = self._dictionary(device, tags, units, kinds)
        parts: list[bytes] = []
        sections = 0
        if not contiguous:
            sections |= _S_SEQ
            parts.append(pack_ints([s - first for s in seqs]))
        sections |= _placement(parts, idx, kinds, ddict)
        one = None
        if len(set(map(id, ts_agent))) == 1:  # one object: one value, one JSON text
            one = orjson.dumps(ts_agent[0], option=_ORJSON_OPTS)
        else:
            texts = orjson.loads(orjson.dumps(ts_agent, option=_ORJSON_OPTS))
            if type(texts[0]) is str and texts.count(texts[0]) == n:
                one = orjson.dumps(texts[0])
        if one is not None and len(one) < 1 << 16:
            parts.append(_U16.pack(len(one)) + one)
        else:
            sections |= _S_TS_AGENT_TABLE
            parts.append(_table(ts_agent))
        if ts_source.count(None) != n:
            sections |= _S_TS_SOURCE
            parts.append(_table(ts_source))
        bad: list[list[Any]] = []
        if not (quality.count("good") == n and reason.count(None) == n and code.count(None) == n):
            flagged = map(
                or_,
                map(or_, map(ne, quality, repeat("good")), map(is_not, reason, repeat(None))),
                map(is_not, code, repeat(None)),
            )
            bad = [[i, quality[i], reason[i], code[i]] for i in compress(range(n), flagged)]
        sections |= _sparse(parts, bad, value_text)
        parts.extend(columns)
        return b"".join(parts), sections, ddict, first, last


def _placement(parts: list[bytes], idx: list[int] | None, kinds: bytes, ddict: _DeviceDict) -> int:
    """Append the tag-index and value-kinds sections (when the record needs them) to
    `parts`; their section bits."""
    sections = 0
    if idx is not None:
        sections |= _S_INDEX
        parts.append(pack_ints(idx))
    if idx is not None or kinds != ddict.kinds:
        sections |= _S_KINDS
        parts.append(kinds)
    return sections


def _sparse(parts: list[bytes], bad: list[list[Any]], texts: list[list[Any]]) -> int:
    """Append the not-good and value_text sections (those that have entries) to `parts`;
    their section bits."""
    sections = 0
    if bad:
        sections |= _S_NOT_GOOD
        parts.append(_blob(orjson.dumps(bad, option=_ORJSON_OPTS)))
    if texts:
        sections |= _S_VALUE_TEXT
        parts.append(_blob(orjson.dumps(texts, option=_ORJSON_OPTS)))
    return sections


def _values(values: list[Any]) -> tuple[list[Any], bytes, list[bytes]]:
    """(values with NaN/±Inf as None, the kind of each, the packed columns by kind)."""
    types = list(map(type, values))
    tset = set(types)
    if float in tset:
        floats = (
            values if len(tset) == 1 else list(compress(values, map(is_, types, repeat(float))))
        )
        total = sum(floats)
        if total - total != 0.0:  # NaN: some value is NaN or ±Inf (or the sum overflowed)
            values = [None if type(v) is float and not math.isfinite(v) else v for v in values]
            types = list(map(type, values))
            tset = set(types)
    if len(tset) == 1:
        (only,) = tset
        kind = _KIND_OF.get(only, _OTHER)
        kinds = bytes((kind,)) * len(values)
        return values, kinds, [_column(kind, values)]
    kind_of = {t: _KIND_OF.get(t, _OTHER) for t in tset}
    kinds = "".join(map({t: chr(k) for t, k in kind_of.items()}.__getitem__, types)).encode(
        "latin-1"
    )
    by_type: dict[type, list[Any]] = {t: [] for t in tset}
    appends = {t: v.append for t, v in by_type.items()}
    for v, t in zip(values, types, strict=True):
        appends[t](v)
    by_kind: dict[int, list[Any]] = {}
    for t in by_type:  # kind "other" may gather several types, in order
        by_kind.setdefault(kind_of[t], [])
    if _OTHER in by_kind:
        by_kind[_OTHER] = [v for v, k in zip(values, kinds, strict=True) if k == _OTHER]
    for t, vals in by_type.items():
        if kind_of[t] != _OTHER:
            by_kind[kind_of[t]] = vals
    columns = [_column(k, by_kind[k]) for k in (_BOOL, _INT, _FLOAT, _STR, _OTHER) if k in by_kind]
    return values, kinds, columns


def _column(kind: int, vals: list[Any]) -> bytes:
    if kind == _NONE:
        return b""
    if kind == _BOOL:
        return bytes(vals)
    if kind == _INT:
        try:
            return pack_ints(vals, planes=True)
        except OverflowError:
            raise _Fallback from None
    if kind == _FLOAT:
        d = array("d", vals)
        f = array("f")
        with contextlib.suppress(OverflowError):  # beyond float32's range: float64
            f = array("f", vals)
        if len(f) == len(d) and array("d", f).tobytes() == d.tobytes():
            return b"f" + _planes(_le(f), 4)
        return b"d" + _planes(_le(d), 8)
    if kind == _STR:
        try:
            encoded = [v.encode() for v in vals]
        except UnicodeEncodeError:
            raise _Fallback from None  # a lone surrogate: orjson refuses it, as before
        return pack_ints(list(map(len, encoded))) + _blob(b"".join(encoded))
    return _blob(orjson.dumps(vals, option=_ORJSON_OPTS))


def _le(a: array[Any]) -> bytes:
    if _BIG:
        a = array(a.typecode, a)
        a.byteswap()
    return a.tobytes()


def _table(vals: list[Any]) -> bytes:
    """Distinct JSON values + an index per value: exact for datetimes (their format-2
    text) and strings alike."""
    texts = orjson.loads(orjson.dumps(vals, option=_ORJSON_OPTS))
    if not set(map(type, texts)) <= {str, type(None)}:
        raise _Fallback  # numbers would collide in the table (1 == 1.0 == True)
    seen: dict[Any, int] = {}
    idx = [seen.setdefault(t, len(seen)) for t in texts]
    return _blob(orjson.dumps(list(seen))) + pack_ints(idx)


def _blob(b: bytes) -> bytes:
    return _U32.pack(len(b)) + b


def _planes(b: bytes, width: int) -> bytes:
    """Byte planes: every value's first byte, then every second byte... The high bytes of
    numbers that differ little are alike, which is what compression finds."""
    if width == 1:
        return b
    return b"".join(b[j::width] for j in range(width))


def _unplanes(b: bytes, width: int) -> bytes:
    if width == 1:
        return b
    n = len(b) // width
    out = bytearray(len(b))
    for j in range(width):
        out[j::width] = b[j * n : (j + 1) * n]
    return bytes(out)


def pack_ints(vals: list[int], planes: bool = False) -> bytes:
    """Ints as a type code and a little-endian array of the narrowest width holding them
    (as byte planes with `planes`: value columns). Raises OverflowError beyond 64 bits."""
    if not vals:
        return b"B"
    lo, hi = min(vals), max(vals)
    if lo >= 0:
        tc = "B" if hi < 1 << 8 else "H" if hi < 1 << 16 else "I" if hi < 1 << 32 else "Q"
    else:
        m = max(-lo - 1, hi)
        tc = "b" if m < 1 << 7 else "h" if m < 1 << 15 else "i" if m < 1 << 31 else "q"
    a = array(tc, vals)
    return tc.encode() + (_planes(_le(a), a.itemsize) if planes else _le(a))


def check_seqs(samples: Sequence[WireSample], last_seq: int) -> tuple[int, int, bool]:
    """(first seq, last seq, consecutive) of a batch; ValueError for an empty batch or
    seqs that are not strictly increasing and above `last_seq`."""
    if not samples:
        raise ValueError("empty batch: append at least one sample")
    first = samples[0]["seq"]
    n = len(samples)
    if type(first) is int and first > last_seq:
        # The common case, consecutive int seqs, checked at C speed; anything else takes
        # the per-sample loop below (which names the offending sample).
        seqs = [s["seq"] for s in samples]
        if seqs == list(range(first, first + n)) and set(map(type, seqs)) == {int}:
            return first, first + n - 1, True
    prev = last_seq
    for s in samples:
        seq = s["seq"]
        if type(seq) is not int or seq <= prev:
            raise ValueError(
                f"seq {seq!r} of {s.get('device')!r}/{s.get('tag')!r} is not above "
                f"{prev} (last_seq was {last_seq}): seqs must be strictly increasing"
            )
        prev = seq
    return first, prev, False


def dictionary_blob(
    device: str, tags: Sequence[str], units: Sequence[str | None], kinds: bytes
) -> bytes:
    """A tag dictionary's bytes (see the module docstring)."""
    js = orjson.dumps([device, list(tags), list(units)])
    head = _DICT_HEAD.pack(DICT_MAGIC, len(js)) + js + _U32.pack(len(kinds)) + kinds
    return head + _U32.pack(zlib.crc32(head))


def _frame(
    payload: bytes, flags: int, sections: int, dcrc: int, first: int, last: int, n: int
) -> bytes:
    head = _BODY_HEAD.pack(BODY_MAGIC, flags, sections, dcrc, first, last, n, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(head))
    return head + payload + _U32.pack(crc)


def encode_samples(samples: Sequence[WireSample] | Sequence[dict[str, Any]]) -> bytes:
    """A self-contained record (dictionary + body) of `samples` (seqs strictly
    increasing): what the forwarder's split makes its sub-records with, so that a part
    decodes to exactly the samples it was cut from."""
    batch = RecordEncoder().encode(samples, -(1 << 63))  # type: ignore[arg-type]
    return batch.full


# ---------------------------------------------------------------------- checks


def check_dictionary(blob: bytes | memoryview) -> Dictionary:
    """Decode and check a dictionary blob; CorruptRecord when it is damaged."""
    b = bytes(blob)
    cached = _dict_cache.get(b)
    if cached is not None:
        return cached
    d, end = _read_dictionary(b, 0)
    if end != len(b):
        raise CorruptRecord("dictionary: trailing bytes")
    if len(_dict_cache) >= _DECODED_DICTS:
        _dict_cache.clear()
    _dict_cache[b] = d
    return d


_dict_cache: dict[bytes, Dictionary] = {}


def _dictionary_end(data: bytes) -> int:
    """Where the dictionary at the start of a self-contained record ends (its lengths
    only; `check_dictionary` checks it)."""
    try:
        _, jlen = _DICT_HEAD.unpack_from(data, 0)
        p = _DICT_HEAD.size + jlen
        (nk,) = _U32.unpack_from(data, p)
    except struct.error:
        raise CorruptRecord("dictionary: truncated") from None
    end = int(p + 4 + nk + _CRC)
    if end > len(data):
        raise CorruptRecord("dictionary: truncated")
    return end


def _read_dictionary(data: bytes, off: int) -> tuple[Dictionary, int]:
    try:
        magic, jlen = _DICT_HEAD.unpack_from(data, off)
        if magic != DICT_MAGIC:
            raise CorruptRecord("dictionary: bad magic")
        p = off + _DICT_HEAD.size + jlen
        (nk,) = _U32.unpack_from(data, p)
        end = p + 4 + nk
        if end + _CRC > len(data):
            raise CorruptRecord("dictionary: truncated")
        (crc,) = _U32.unpack_from(data, end)
    except struct.error:
        raise CorruptRecord("dictionary: truncated") from None
    if zlib.crc32(memoryview(data)[off:end]) != crc:
        raise CorruptRecord("dictionary: checksum mismatch")
    try:
        device, tags, units = orjson.loads(memoryview(data)[off + _DICT_HEAD.size : p])
    except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
        raise CorruptRecord(f"dictionary: {exc}") from None
    kinds = data[p + 4 : end]
    # What the encoder writes (it stores anything else as JSON): checked here, once per
    # dictionary (then cached), so readers by columns need not check every record.
    if (
        type(device) is not str
        or type(tags) is not list
        or type(units) is not list
        or not set(map(type, tags)) <= {str}
        or not set(map(type, units)) <= {str, type(None)}
    ):
        raise CorruptRecord("dictionary: names that are not text")
    if len(tags) != len(units) or len(kinds) != len(tags):
        raise CorruptRecord("dictionary: columns of different lengths")
    blob = data[off : end + _CRC] if off or end + _CRC != len(data) else data
    return Dictionary(device, tuple(tags), tuple(units), kinds, crc, blob), end + _CRC


def check_body(body: bytes | memoryview) -> BodyHeader:
    """Check a body's layout and checksum (without decoding it); CorruptRecord when it is
    damaged."""
    try:
        magic, flags, _sections, dcrc, first, last, n, plen = _BODY_HEAD.unpack_from(body, 0)
    except struct.error:
        raise CorruptRecord("record: truncated header") from None
    if magic != BODY_MAGIC:
        raise CorruptRecord("record: bad magic")
    end = _BODY_HEAD.size + plen
    if end + _CRC != len(body):
        raise CorruptRecord("record: length does not match")
    (crc,) = _U32.unpack_from(body, end)
    if zlib.crc32(memoryview(body)[:end]) != crc:
        raise CorruptRecord("record: checksum mismatch")
    if flags & ~(_JSON_BODY | 3) or flags & 3 > _COMP_ZLIB or n <= 0 or last < first:
        raise CorruptRecord("record: bad header")
    return BodyHeader(first, last, n, dcrc, bool(flags & _JSON_BODY))


def is_body(data: bytes) -> bool:
    """True for a format-3 body (as stored), False for a format-2 JSON array."""
    return data[:2] == BODY_MAGIC


def split_record(data: bytes) -> tuple[bytes, bytes]:
    """(dictionary blob or b"", body) of a self-contained format-3 record."""
    if data[:2] == DICT_MAGIC:
        d, end = _read_dictionary(data, 0)
        return d.blob, data[end:]
    return b"", data


def join(dictionary: bytes, body: bytes) -> bytes:
    """The self-contained record of a stored body and its dictionary, checked: raises
    CorruptRecord when either is damaged or they do not belong together."""
    head = check_body(body)
    if head.json:
        return body
    d = check_dictionary(dictionary)
    if d.crc != head.dict_crc:
        raise CorruptRecord("record: refers to another dictionary")
    return dictionary + body


# ---------------------------------------------------------------------- decoding


def is_record(data: bytes) -> bool:
    """True for a format-3 record (self-contained or a JSON body)."""
    return data[:2] in (DICT_MAGIC, BODY_MAGIC)


def record_columns(data: bytes) -> RecordColumns:
    """A format-3 record by columns (see `RecordColumns`), checked; CorruptRecord
    (a ValueError) when it is damaged."""
    if data[:2] == DICT_MAGIC:
        end = _dictionary_end(data)
        d = check_dictionary(data[:end])  # decoded once per dictionary, then from the cache
        return _columns_of(d, memoryview(data)[end:])
    head = check_body(data)
    if not head.json:
        raise CorruptRecord("record: a stored body without its dictionary")
    return columns_of_samples(_payload_samples(data, head))


def decode_samples(data: bytes) -> list[dict[str, Any]]:
    """The samples of a format-3 record, as dicts in the format-2 shape."""
    if data[:2] == BODY_MAGIC:
        head = check_body(data)
        if head.json:
            return _payload_samples(data, head)
    return samples_of_columns(record_columns(data))


def _payload(body: bytes | memoryview, head_flags: int, plen: int) -> bytes:
    raw = bytes(body[_BODY_HEAD.size : _BODY_HEAD.size + plen])
    if head_flags & 3 == _COMP_ZLIB:
        try:
            return zlib.decompress(raw)
        except zlib.error as exc:
            raise CorruptRecord(f"record: {exc}") from None
    return raw


def _payload_samples(body: bytes, head: BodyHeader) -> list[dict[str, Any]]:
    flags = body[2]
    (plen,) = _U32.unpack_from(body, _BODY_HEAD.size - 4)
    try:
        samples = orjson.loads(_payload(body, flags, plen))
    except orjson.JSONDecodeError as exc:
        raise CorruptRecord(f"record: {exc}") from None
    if not isinstance(samples, list) or len(samples) != head.count:
        raise CorruptRecord("record: not a list of its samples")
    return samples


class _Reader:
    __slots__ = ("buf", "off")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.off = 0

    def take(self, n: int) -> bytes:
        end = self.off + n
        if end > len(self.buf):
            raise CorruptRecord("record: payload truncated")
        out = self.buf[self.off : end]
        self.off = end
        return out

    def u32(self) -> int:
        return int(_U32.unpack(self.take(4))[0])

    def blob(self) -> bytes:
        return self.take(self.u32())

    def json(self) -> Any:
        try:
            return orjson.loads(self.blob())
        except orjson.JSONDecodeError as exc:
            raise CorruptRecord(f"record: {exc}") from None

    def ints(self, n: int, planes: bool = False) -> list[int]:
        tc = chr(self.take(1)[0])
        if tc not in "bBhHiIqQ":
            raise CorruptRecord("record: bad int array")
        a = array(tc)
        raw = self.take(n * a.itemsize)
        a.frombytes(_unplanes(raw, a.itemsize) if planes else raw)
        if _BIG:
            a.byteswap()
        return a.tolist()


def _columns_of(d: Dictionary, body: memoryview) -> RecordColumns:
    head = check_body(body)
    if head.json:
        raise CorruptRecord("record: a JSON body after a dictionary")
    if head.dict_crc != d.crc:
        raise CorruptRecord("record: refers to another dictionary")
    flags, sections = body[2], body[3]
    (plen,) = _U32.unpack_from(body, _BODY_HEAD.size - 4)
    r = _Reader(_payload(body, flags, plen))
    n, first = head.count, head.first_seq
    seqs: Sequence[int]
    if sections & _S_SEQ:
        seqs = [first + s for s in r.ints(n)]
        if seqs[-1] != head.last_seq:
            raise CorruptRecord("record: seqs do not match the header")
    else:
        seqs = range(first, first + n)
        if head.last_seq != first + n - 1:
            raise CorruptRecord("record: seqs do not match the header")
    try:
        if sections & _S_INDEX:
            idx = r.ints(n)
            tags: Sequence[str] = [d.tags[i] for i in idx]
            units: Sequence[str | None] = [d.units[i] for i in idx]
        else:
            if len(d.tags) != n:
                raise CorruptRecord("record: count does not match its dictionary")
            tags, units = d.tags, d.units
        kinds = r.take(n) if sections & _S_KINDS else d.kinds
        ts_single: Any = None
        if sections & _S_TS_AGENT_TABLE:
            table = r.json()
            ts_agent: Sequence[Any] = [table[i] for i in r.ints(n)]
        else:
            (tlen,) = _U16.unpack(r.take(2))
            try:
                ts_single = orjson.loads(r.take(tlen))
            except orjson.JSONDecodeError as exc:
                raise CorruptRecord(f"record: {exc}") from None
            ts_agent = [ts_single] * n
        ts_source = None
        if sections & _S_TS_SOURCE:
            table = r.json()
            ts_source = [table[i] for i in r.ints(n)]
        not_good: dict[int, tuple[Any, Any, Any]] = {}
        if sections & _S_NOT_GOOD:
            not_good = {int(i): (q, rs, c) for i, q, rs, c in r.json()}
        value_text: dict[int, Any] = {}
        if sections & _S_VALUE_TEXT:
            value_text = {int(i): t for i, t in r.json()}
        values = _read_values(r, kinds)
    except (IndexError, TypeError, ValueError, KeyError) as exc:
        if isinstance(exc, CorruptRecord):
            raise
        raise CorruptRecord(f"record: {type(exc).__name__}: {exc}") from None
    if r.off != len(r.buf):
        raise CorruptRecord("record: trailing bytes in the payload")
    if not all(0 <= i < n for i in (*not_good, *value_text)):
        raise CorruptRecord("record: index out of range")
    return RecordColumns(
        d.device, tags, units, values, seqs, ts_agent, ts_single, ts_source, not_good, value_text
    )


def _read_values(r: _Reader, kinds: bytes) -> list[Any]:
    n = len(kinds)
    cols: dict[int, list[Any]] = {}
    for kind in (_BOOL, _INT, _FLOAT, _STR, _OTHER):
        m = kinds.count(kind)
        if not m:
            continue
        if kind == _BOOL:
            cols[kind] = [b != 0 for b in r.take(m)]
        elif kind == _INT:
            cols[kind] = r.ints(m, planes=True)
        elif kind == _FLOAT:
            tc = chr(r.take(1)[0])
            if tc not in "fd":
                raise CorruptRecord("record: bad float array")
            a = array(tc)
            a.frombytes(_unplanes(r.take(m * a.itemsize), a.itemsize))
            if _BIG:
                a.byteswap()
            cols[kind] = a.tolist()
        elif kind == _STR:
            lengths = r.ints(m)
            text = r.blob()
            if sum(lengths) != len(text):
                raise CorruptRecord("record: string lengths do not match")
            out, pos = [], 0
            for ln in lengths:
                out.append(text[pos : pos + ln].decode())
                pos += ln
            cols[kind] = out
        else:
            vals = r.json()
            if not isinstance(vals, list) or len(vals) != m:
                raise CorruptRecord("record: bad JSON column")
            cols[kind] = vals
    if kinds.count(_NONE) + sum(map(len, cols.values())) != n:
        raise CorruptRecord("record: bad value kinds")
    if len(cols) == 1 and not kinds.count(_NONE):
        return next(iter(cols.values()))
    its: dict[int, Iterator[Any]] = {k: iter(v) for k, v in cols.items()}
    its[_NONE] = repeat(None)
    nexts = [its[k].__next__ if k in its else None for k in range(6)]
    return [nexts[k]() for k in kinds]  # type: ignore[misc]


def samples_of_columns(c: RecordColumns) -> list[dict[str, Any]]:
    """One dict per sample, in the format-2 shape and key order."""
    dev = c.device
    ts_source = c.ts_source if c.ts_source is not None else [None] * len(c.values)
    out = [
        {
            "device": dev,
            "tag": t,
            "value": v,
            "quality": "good",
            "reason": None,
            "code": None,
            "ts_source": src,
            "ts_agent": ta,
            "unit": u,
            "seq": s,
        }
        for t, v, src, ta, u, s in zip(
            c.tags, c.values, ts_source, c.ts_agent, c.units, c.seqs, strict=True
        )
    ]
    for i, (q, r, code) in c.not_good.items():
        s = out[i]
        s["quality"], s["reason"], s["code"] = q, r, code
    for i, text in c.value_text.items():
        out[i]["value_text"] = text
    return out


def columns_of_samples(samples: list[dict[str, Any]]) -> RecordColumns:
    """`RecordColumns` of decoded sample dicts (format-2 records, JSON bodies)."""
    if not samples:
        raise ValueError("not a record: no samples")
    try:
        ts_agent = [s["ts_agent"] for s in samples]
        src = [s["ts_source"] for s in samples]
        single = ts_agent[0] if ts_agent.count(ts_agent[0]) == len(ts_agent) else None
        return RecordColumns(
            device=samples[0]["device"],
            tags=[s["tag"] for s in samples],
            units=[s["unit"] for s in samples],
            values=[s["value"] for s in samples],
            seqs=[s["seq"] for s in samples],
            ts_agent=ts_agent,
            ts_agent_single=single,
            ts_source=None if src.count(None) == len(src) else src,
            not_good={
                i: (s["quality"], s["reason"], s["code"])
                for i, s in enumerate(samples)
                if not (s["quality"] == "good" and s["reason"] is None and s["code"] is None)
            },
            value_text={i: s["value_text"] for i, s in enumerate(samples) if "value_text" in s},
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a record: {type(exc).__name__}: {exc}") from None
