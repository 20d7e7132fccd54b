"""Framing and envelopes: the bytes on the wire, and every way a peer can get them wrong."""

from __future__ import annotations

import io
import json
import struct

import pytest

from provisioner.bridge.protocol import (
    ABSOLUTE_MAX_FRAME_BYTES,
    ErrorType,
    Request,
    decode_reply,
    decode_request,
    dumps,
    encode_frame,
    encode_message,
    error_reply,
    ok_reply,
    parse_request,
    read_frame,
)
from provisioner.errors import BridgeError, ProtocolError


def test_frame_is_big_endian_length_then_payload() -> None:
    frame = encode_frame(b'{"a":1}')
    assert frame[:4] == b"\x00\x00\x00\x07"
    assert frame[4:] == b'{"a":1}'
    big = encode_frame(b"x" * 0x010203)
    assert big[:4] == bytes([0x00, 0x01, 0x02, 0x03])


def test_frames_round_trip_back_to_back() -> None:
    stream = io.BytesIO(encode_frame(b"one") + encode_frame(b"") + encode_frame("ü€".encode()))
    assert read_frame(stream) == b"one"
    assert read_frame(stream) == b""
    assert read_frame(stream) == "ü€".encode()
    assert read_frame(stream) is None  # clean EOF at a frame boundary


@pytest.mark.parametrize("data", [b"", b"\x00\x00", encode_frame(b"abcdef")[:-2]])
def test_eof_in_the_header_or_the_body_means_the_peer_is_gone(data: bytes) -> None:
    assert read_frame(io.BytesIO(data)) is None


def test_a_length_over_the_maximum_is_refused_without_reading_the_body() -> None:
    stream = io.BytesIO(struct.pack(">I", 1025) + b"x" * 1025)
    with pytest.raises(ProtocolError, match="1025 bytes exceeds the maximum of 1024"):
        read_frame(stream, max_bytes=1024)
    assert stream.tell() == 4
    assert read_frame(io.BytesIO(encode_frame(b"x" * 1024)), max_bytes=1024) == b"x" * 1024


def test_messages_are_compact_utf8_json_without_nan() -> None:
    assert dumps({"q": "Grüße", "n": [1, 2]}) == '{"q":"Grüße","n":[1,2]}'.encode()
    assert encode_message({"a": 1}) == encode_frame(b'{"a":1}')
    with pytest.raises(ValueError):
        dumps({"x": float("nan")})


def _rejection(payload: bytes) -> BridgeError:
    with pytest.raises(BridgeError) as info:
        decode_request(payload)
    return info.value


def test_a_valid_request_decodes() -> None:
    request = decode_request(b'{"id": 7, "command": "ping", "args": {"x": 1}}')
    assert request == Request(7, "ping", {"x": 1})
    assert decode_request(b'{"id": "abc", "command": "ping"}').args == {}
    assert decode_request(b'{"id": 1, "command": "ping", "args": null}').args == {}
    assert json.loads(dumps(request.to_message())) == {"id": 7, "command": "ping", "args": {"x": 1}}


def test_non_utf8_and_other_unicode_encodings_are_refused() -> None:
    error = _rejection(b'{"id": 1, "command": "\xff"}')
    assert error.error_type == ErrorType.INVALID_ENCODING
    assert "UTF-8" in error.message
    # json.loads(bytes) alone would accept UTF-16; the protocol says UTF-8.
    error = _rejection('{"id": 1, "command": "ping"}'.encode("utf-16"))
    assert error.error_type == ErrorType.INVALID_ENCODING


@pytest.mark.parametrize("payload", [b"{", b"not json", b'{"id": 1,}', b"[" * 100_000])
def test_invalid_json_is_refused(payload: bytes) -> None:
    assert _rejection(payload).error_type == ErrorType.INVALID_JSON


@pytest.mark.parametrize(
    ("message", "fragment", "request_id"),
    [
        ([1, 2], "must be a JSON object, got an array", None),
        ("ping", "must be a JSON object, got a string", None),
        ({"command": "ping"}, "'id' must be an integer or a string, got missing", None),
        ({"id": True, "command": "ping"}, "'id' must be an integer or a string, got a boolean", None),
        ({"id": 1.5, "command": "ping"}, "got a number", None),
        ({"id": None, "command": "ping"}, "got null", None),
        ({"id": 3}, "'command' must be a non-empty string, got missing", 3),
        ({"id": 3, "command": 5}, "'command' must be a non-empty string, got a number", 3),
        ({"id": 3, "command": ""}, "'command' must be a non-empty string", 3),
        ({"id": "x", "command": "ping", "args": [1]}, "'args' must be an object, got an array", "x"),
        ({"id": {}, "command": "ping"}, "'id' must be an integer or a string, got an object", None),
        (("not", "json"), "must be a JSON object, got a tuple", None),
        ({"id": 4, "command": "ping", "extra": 1}, "unknown request key(s) 'extra'", 4),
    ],
)
def test_malformed_envelopes_name_the_problem_and_keep_the_id(
    message: object, fragment: str, request_id: object
) -> None:
    with pytest.raises(BridgeError) as info:
        parse_request(message)
    assert info.value.error_type == ErrorType.INVALID_REQUEST
    assert fragment in info.value.message
    assert info.value.request_id == request_id


def test_a_lone_surrogate_goes_back_as_the_escape_it_came_as() -> None:
    """JSON text may carry a lone surrogate as an escape (``"\\ud800"``); ``json.loads`` keeps it,
    and such a string cannot be UTF-8. A reply echoing it is written with ASCII escapes instead of
    failing, so the peer reads back exactly the string it sent."""
    request = decode_request(b'{"id":"\\ud800x","command":"ping"}')
    assert request.id == "\ud800x"
    payload = dumps(ok_reply(request.id, {"name": "caf\u00e9"}))
    assert payload == b'{"id":"\\ud800x","success":true,"result":{"name":"caf\\u00e9"}}'
    assert decode_reply(payload).id == "\ud800x"
    assert dumps({"name": "caf\u00e9"}) == '{"name":"caf\u00e9"}'.encode()  # UTF-8 whenever it can be


def test_a_frame_over_the_header_s_range_cannot_be_encoded() -> None:
    """The header is an unsigned 32-bit length: a 4 GiB payload (an anonymous mapping, never
    touched, so it costs no memory) is refused before anything is copied."""
    import mmap

    with (mmap.mmap(-1, ABSOLUTE_MAX_FRAME_BYTES + 1) as huge, memoryview(huge) as view,
          pytest.raises(ProtocolError, match="at most 4294967295 bytes")):
        encode_frame(view)  # type: ignore[arg-type]


def test_replies_round_trip_and_unwrap() -> None:
    ok = decode_reply(dumps(ok_reply(5, {"status": "ok"})))
    assert ok.id == 5 and ok.success and ok.unwrap() == {"status": "ok"}
    failed = decode_reply(dumps(error_reply("a", "no such program", "ProgramNotFound")))
    with pytest.raises(BridgeError) as info:
        failed.unwrap()
    assert (info.value.error_type, info.value.message, info.value.request_id) == (
        "ProgramNotFound",
        "no such program",
        "a",
    )
    assert error_reply(None, "m", "T") == {"id": None, "success": False, "error": "m", "error_type": "T"}


@pytest.mark.parametrize(
    "payload",
    [
        b"[]",
        b'{"success": true, "result": {}}',
        b'{"id": 1, "success": "yes"}',
        b'{"id": 1, "success": true, "result": []}',
        b'{"id": 1, "success": false, "error": "x"}',
        b"\xff",
    ],
)
def test_malformed_replies_are_protocol_errors(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_reply(payload)
