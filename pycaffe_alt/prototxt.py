"""Read and write Caffe's protobuf files (text prototxt and binary) with precise errors.

Text files are parsed by protobuf's ``text_format.Parse``, which accepts what Caffe's C++
``TextFormat::Parse`` accepts: ``#`` comments, repeated fields written several times, strings
in single or double quotes, enum values by name or number; and, like Caffe, it rejects a
singular field given twice. String escapes are read as C++ protobuf reads them: the few that
Python's parser reads otherwise are rewritten first (``\\?``, surrogate pairs) or refused.
Errors become :class:`~pycaffe_alt.errors.PrototxtError` with ``file:line:col``, a readable
message and a hint (close field names, valid enum values).

Nets and solvers are upgraded from legacy formats on read, as Caffe's
``ReadNetParamsFrom*FileOrDie`` / ``ReadSolverParamsFromTextFileOrDie`` do (see upgrade.py).
Relative paths inside files (``net: "examples/..."``, data sources) are kept as written: Caffe
resolves them against the current directory, not the file's.
"""
from __future__ import annotations

import difflib
import os
import re
from typing import Dict, Optional, Tuple, TypeVar, Union

from google.protobuf import message as pb_message
from google.protobuf import text_format

from . import fileio, upgrade
from .errors import PrototxtError, located_in
from .proto import caffe_pb2
from .proto.text_fields import invalid_text_field

PathOrText = Union[str, "os.PathLike[str]"]
M = TypeVar("M", bound=pb_message.Message)

# Bytes that never occur in a text prototxt but almost always early in a binary protobuf
# (field tags and lengths below 0x20): control characters other than whitespace.
_BINARY_BYTES = frozenset(range(0x00, 0x09)) | frozenset(range(0x0E, 0x20)) | {0x7F}
_BINARY_BYTES_DELETE = bytes(sorted(_BINARY_BYTES))
_SNIFF_BYTES = 8192


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------

def read_net(path_or_text: PathOrText) -> caffe_pb2.NetParameter:
    """A NetParameter from a prototxt path, a caffemodel path, or prototxt text; upgraded.

    A file is read as text unless its first bytes look binary (a ``.caffemodel``). Legacy
    formats (V0, V1, input fields, old BatchNorm params) are upgraded as Caffe does on load, and
    a warning is logged on the "pycaffe_alt" logger when that happens.
    """
    net = caffe_pb2.NetParameter()
    source, data = _source_of(path_or_text)
    if data is None:
        raw = _read_bytes(source)
        if _looks_binary(raw[:_SNIFF_BYTES]):
            try:
                _parse_binary(raw, net, source)
            except PrototxtError:
                _refuse_stray_control_byte(raw, source)
                raise
        else:
            parse_text(_decode_text(raw, source), net, source)
    else:
        parse_text(data, net, source)
    with located_in(source):  # upgrade rules (input_dim counts...) name no file themselves
        upgrade.upgrade_net_as_needed(net, source)
    return net


def read_solver(path: PathOrText) -> caffe_pb2.SolverParameter:
    """A SolverParameter from a solver prototxt (path, or text), upgraded as Caffe does.

    The old ``solver_type`` enum becomes the ``type`` string; when read from a file, a missing
    (or directory) ``snapshot_prefix`` is derived from the file name (Caffe's
    UpgradeSnapshotPrefixProperty). ``net:`` paths are kept exactly as written.
    """
    solver = caffe_pb2.SolverParameter()
    source, data = _source_of(path)
    if data is None:
        parse_text(read_text_file(source), solver, source)
    else:
        parse_text(data, solver, source)
    with located_in(source):
        upgrade.upgrade_solver_as_needed(solver, source)
        if data is None:
            upgrade.upgrade_snapshot_prefix(solver, source)
    return solver


def read_text_file(path: PathOrText) -> str:
    """The contents of a text file, with PrototxtError for a missing or non-UTF-8 file."""
    source = os.fspath(path)
    return _decode_text(_read_bytes(source), source)


def parse_text(text: str, message: M, filename: str = "<text>") -> M:
    """Parse prototxt ``text`` into ``message`` (cleared first) and return it.

    Raises PrototxtError with ``filename:line:col`` on a syntax error, an unknown field or enum
    value, or a singular field given twice.
    """
    if text.startswith("\ufeff"):  # a BOM some editors write; not part of the syntax
        text = text[1:]
    message.Clear()
    try:
        text_format.Parse(_cpp_string_escapes(text), message)
    except text_format.ParseError as exc:
        raise _readable_parse_error(exc, text, message, filename) from None
    _refuse_invalid_escape(text, filename)
    return message


def read_binary(path: PathOrText, message: M) -> M:
    """Parse the binary protobuf file at ``path`` into ``message`` (cleared first), return it."""
    source = os.fspath(path)
    return _parse_binary(_read_bytes(source), message, source)


def write_text(message: pb_message.Message, path: PathOrText) -> None:
    """Write ``message`` as prototxt to ``path`` atomically (temporary file, then rename)."""
    _write_atomic(os.fspath(path), text_format.MessageToString(message).encode("utf-8"))


# An unquoted value with a trailing ".0": only a float field prints so (integers have no dot,
# enums are names, strings are quoted).
_INTEGRAL_FLOAT = re.compile(r"^(\s*\w+: -?\d+)\.0$", re.M)


def debug_string(message: pb_message.Message) -> str:
    """``message`` as C++ protobuf's ``DebugString()`` writes it, which Caffe logs (the solver's
    parameters): the text format without the final newline, and an integral float as ``1``
    where Python's text_format writes ``1.0`` (C++ prints floats with ``%g``)."""
    return _INTEGRAL_FLOAT.sub(r"\1", text_format.MessageToString(message)).rstrip("\n")


def write_binary(message: pb_message.Message, path: PathOrText) -> None:
    """Write ``message`` in binary wire format to ``path`` atomically."""
    _write_atomic(os.fspath(path), message.SerializeToString())


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

def _source_of(path_or_text: PathOrText) -> Tuple[str, Optional[str]]:
    """(name for messages, text) — text is None when the argument names a file.

    A str is prototxt text when it is not an existing file and contains a character no sane
    path has in this role (newline, brace, colon, quote); otherwise it is a path.
    """
    if not isinstance(path_or_text, str):
        return os.fspath(path_or_text), None
    if os.path.isfile(path_or_text):
        return path_or_text, None
    if any(c in path_or_text for c in "\n{}:\"'"):
        return "<text>", path_or_text
    return path_or_text, None


def _read_bytes(path: str) -> bytes:
    return fileio.read_input_bytes(path, PrototxtError)


def _looks_binary(head: bytes) -> bool:
    return any(b in _BINARY_BYTES for b in head)


def _refuse_stray_control_byte(raw: bytes, source: str) -> None:
    """A file that is not binary protobuf but text with a few control bytes (a NUL pasted into
    a name) is a damaged prototxt: say where the byte is instead of "corrupt binary"."""
    limit = max(8, len(raw) // 100)
    text = raw.translate(None, _BINARY_BYTES_DELETE)  # at C speed: a binary file has many
    count = len(raw) - len(text)
    if not 0 < count <= limit:
        return
    try:
        text.decode("utf-8")
    except UnicodeDecodeError:
        return
    first = min(i for i in (raw.find(bytes([b])) for b in set(_BINARY_BYTES)) if i >= 0)
    line = raw.count(b"\n", 0, first) + 1
    column = first - (raw.rfind(b"\n", 0, first) + 1) + 1
    raise PrototxtError(f"control character 0x{raw[first]:02x} in a text prototxt "
                        f"({count} in the file)", where=f"{source}:{line}:{column}",
                        hint="remove it: a prototxt holds no control characters other than tabs "
                             "and line breaks")


def _decode_text(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise PrototxtError("the file is not UTF-8 text", where=f"{source}:{line}:{column}",
                            hint="save the prototxt as UTF-8") from None


def _parse_binary(raw: bytes, message: M, source: str) -> M:
    message.Clear()
    name = message.DESCRIPTOR.name
    try:
        message.ParseFromString(raw)
    except pb_message.DecodeError:
        raise PrototxtError(
            f"not a valid {name} (truncated or corrupt)", where=source,
            hint=f"the file should be a binary {name}; re-download or re-create it") from None
    bad = invalid_text_field(message)
    if bad is not None:
        raise PrototxtError(f"field {bad} of this binary {name} is not valid UTF-8 text; the file "
                            "is corrupt", where=source, hint="re-download or re-create it")
    return message


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------

def _write_atomic(path: str, payload: bytes) -> None:
    fileio.atomic_write(path, payload, PrototxtError)


# --------------------------------------------------------------------------------------------
# readable parse errors
# --------------------------------------------------------------------------------------------

_POSITION = re.compile(r"^(\d+):(\d+)\s*:\s*")
_UNKNOWN_FIELD = re.compile(r'Message type "([\w.]+)" has no field named "([^"]+)"')
_UNKNOWN_ENUM_NAME = re.compile(r'Enum type "([\w.]+)" has no value named (.+?)\.?$')
_UNKNOWN_ENUM_NUMBER = re.compile(r'Enum type "([\w.]+)" has no value with number (-?\d+)')
_DUPLICATE = re.compile(r'Message type "([\w.]+)" should not have multiple "([^"]+)" fields')
_EXPECTED_STRING = re.compile(r"Expected string but found: '(.*)'")

# Fields that moved between formats: a hint beats a plain "no such field".
_LEGACY_FIELD_HINTS = {
    "blobs_lr": "blobs_lr is the old V1 form; inside layer {} write param { lr_mult: ... } "
                "once per parameter blob",
    "weight_decay": "weight_decay per blob is the old V1 form; inside layer {} write "
                    "param { decay_mult: ... } once per parameter blob",
    "solver_type": "solver_type is the old enum form; write type: \"SGD\" (or Nesterov, "
                   "AdaGrad, RMSProp, AdaDelta, Adam)",
    # DeepLab v1's fork named the atrous rate 'hole' (hole_h/hole_w) before BVLC added dilation.
    "hole": "'hole' is DeepLab v1's name for the atrous rate; BVLC Caffe calls it dilation: "
            "write dilation: N in convolution_param",
    "hole_h": "'hole_h' is DeepLab v1's atrous rate; write dilation: N (one value per spatial "
              "axis for different rates) in convolution_param",
    "hole_w": "'hole_w' is DeepLab v1's atrous rate; write dilation: N (one value per spatial "
              "axis for different rates) in convolution_param",
}

# Text-format tokens, enough to follow blocks: comments and quoted strings (either quote,
# backslash escapes) are skipped whole, so braces inside them do not count.
_TOKEN = re.compile(r"""
    (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"?|'(?:[^'\\\n]|\\.)*'?)
  | (?P<open>[{<])
  | (?P<close>[}>])
  | (?P<word>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<colon>:)
  | (?P<other>[^\s])
""", re.VERBOSE)


# What may follow a backslash in a string, per C++ protobuf's tokenizer (ConsumeString): a
# letter escape, an octal digit, \x and a hex digit, \u and four, \U and eight up to 10ffff.
_VALID_ESCAPE = re.compile(r"""[abfnrtv\\?'"]|[0-7]|x[0-9A-Fa-f]|u[0-9A-Fa-f]{4}"""
                           r"|U00(?:0[0-9A-Fa-f]|10)[0-9A-Fa-f]{4}")


_SURROGATE_PAIR = re.compile(r"\\u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})", re.I)


def _cpp_string_escapes(text: str) -> str:
    r"""``text`` with the string escapes Python's parser reads otherwise than C++ protobuf's
    ParseStringAppend (which Caffe's ReadProtoFromTextFile uses) rewritten to what C++ reads:
    ``\?`` is '?' (TranslateEscape; Python kept both characters), and a UTF-16 surrogate
    pair in two ``\u`` escapes is one code point (FetchUnicodePoint; Python refused it)."""
    if "\\?" not in text and "\\u" not in text:
        return text
    pieces, done = [], 0
    for match in _TOKEN.finditer(text):
        if match.lastgroup != "string" or "\\" not in match.group():
            continue
        token, out, i = match.group(), [], 0
        while i < len(token):
            if token[i] != "\\" or i + 1 == len(token):
                out.append(token[i])
                i += 1
                continue
            pair = _SURROGATE_PAIR.match(token, i)
            if token[i + 1] == "?":
                out.append("?")
            elif pair:
                head, trail = int(pair.group(1), 16), int(pair.group(2), 16)
                out.append("\\U%08x" % (0x10000 + ((head - 0xD800) << 10 | (trail - 0xDC00))))
                i = pair.end()
                continue
            else:  # any other escape is read alike; its letter is no escape of its own
                out.append(token[i:i + 2])
            i += 2
        pieces += [text[done:match.start()], "".join(out)]
        done = match.end()
    return "".join(pieces) + text[done:]


def _refuse_invalid_escape(text: str, filename: str) -> None:
    r"""Refuse a string escape Caffe's parser refuses ("Invalid escape sequence in string
    literal"): Python's parser keeps an unknown one such as ``\q`` as the two characters, so a
    file Caffe rejects built a net with a layer or source name Caffe never reads."""
    if "\\" not in text:
        return
    for match in _TOKEN.finditer(text):
        if match.lastgroup != "string" or "\\" not in match.group():
            continue
        body, start = match.group()[1:], match.start() + 1
        i = body.find("\\")
        while i >= 0:
            if not _VALID_ESCAPE.match(body, i + 1):
                offset = start + i
                line = text.count("\n", 0, offset) + 1
                column = offset - (text.rfind("\n", 0, offset) + 1) + 1
                escape = body[i:i + 2]
                what = f"invalid escape sequence '{escape}' in a string"
                hint = ("Caffe's parser refuses it; write \\\\ for a backslash (\\n, \\t, "
                        "\\\", \\x41, \\101 are the escapes it knows)")
                if escape == "\\X" and re.match("[0-9A-Fa-f]", body[i + 2:i + 3]):
                    # C++ protobuf's tokenizer lets \X through, but the ParseStringAppend of
                    # Caffe's time decodes only a lower-case \x (\X41 is "?41"); newer ones
                    # read it as hex: what the file means depends on the protobuf.
                    what = (f"escape '\\X{body[i + 2:i + 4]}' in a string: Caffe reads it "
                            "as '?' and the digits (the protobuf of Caffe's time) or as a "
                            "hex escape (recent protobuf)")
                    hint = f"write \\x{body[i + 2:i + 4]} (lower-case x) for the hex escape"
                try:
                    layer = _enclosing_layer(text, line, column)
                except (IndexError, ValueError, TypeError, RecursionError):
                    layer = None
                if layer is not None:
                    what = f"layer '{layer[0]}' (type {layer[1]}): {what}"
                raise PrototxtError(what, where=f"{filename}:{line}:{column}", hint=hint)
            i = body.find("\\", i + 2)


def _readable_parse_error(exc: text_format.ParseError, text: str, message: pb_message.Message,
                          filename: str) -> PrototxtError:
    raw = str(exc)
    line, column = exc.GetLine(), exc.GetColumn()
    detail = _POSITION.sub("", raw)
    # upb/python quote the offending source line before the message: drop it, we give line:col.
    if line is not None:
        lines = text.splitlines()
        if 0 < line <= len(lines):
            quoted = f"'{lines[line - 1]}': "
            if detail.startswith(quoted):
                detail = detail[len(quoted):]
    where = f"{filename}:{line}:{column}" if line is not None else filename
    field = _unfinished_last_field(text) if detail.startswith("'': ") else None
    if field is not None:
        # The parser ran out of text: upb then quotes an empty line ('': Couldn't parse
        # integer: ) and names no token, which read as a bug rather than a cut-short file.
        what = f"the file ends after '{field}', before its value"
        hint = ("the file was cut short (an interrupted copy or save?) or its last field lacks "
                "a value: complete that field or remove it")
    else:
        what, hint = _explain(detail, message)
    try:
        layer = _enclosing_layer(text, line, column or 1) if line is not None else None
    except (IndexError, ValueError, TypeError, RecursionError):  # only an addition to the message
        layer = None
    if layer is not None:
        name, kind = layer
        what = f"layer '{name}' (type {kind}): {what}"
        match = _UNKNOWN_FIELD.search(detail)
        message_name, field = match.groups() if match else ("", "")
        if message_name.endswith("LayerParameter") and field.endswith("_param") \
                and field[:-len("_param")].replace("_", "") == kind.lower():
            # The layer's own parameter block (R-FCN's psroi_pooling_param of PSROIPooling,
            # YOLO's reorg_param...) missing from caffe.proto: the type is a fork's, and a
            # close BVLC field name (pooling_param) would be the wrong suggestion.
            hint = (f"'{field}' is the parameter block of a layer type that a Caffe fork "
                    f"adds; {kind} is not a layer of BVLC Caffe and cannot be built here "
                    "(caffe.layer_type_list() lists the supported types; a Python layer can "
                    "stand in for it)")
        elif match and _unimplemented_type(kind):
            # A field of another fork's layer of the same name (C3D's VideoData: source,
            # new_length; caffe.proto holds the SSD fork's VideoDataParameter): fixing the field
            # would only lead to the unknown type, so say that now.
            hint = (f"{hint + '; ' if hint else ''}the type {kind} is not implemented here "
                    "either (a Caffe fork's layer, whose parameters differ from the "
                    f"{message_name.split('.')[-1]} of caffe.proto): replace that layer (a data layer by an "
                    "Input layer with the same tops) or remove it")
    return PrototxtError(what, where=where, hint=hint)


def _unfinished_last_field(text: str) -> Optional[str]:
    """The field name that ``text`` ends with (``name`` or ``name:``, then only blanks and
    comments), or None when the text ends otherwise (a value, a brace)."""
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(text) if m.lastgroup != "comment"]
    if tokens and tokens[-1][0] == "colon":
        tokens.pop()
    return tokens[-1][1] if tokens and tokens[-1][0] == "word" else None


def _unimplemented_type(kind: str) -> bool:
    """True for a layer type string (not a V1 enum name, nor '?') that no class implements."""
    if kind == "?" or kind.isupper():
        return False
    from .layers import LAYERS  # the package fills the registry (imported on this path only)

    return kind not in LAYERS


def _enclosing_layer(text: str, line: int, column: int) -> Optional[Tuple[str, str]]:
    """(name, type) of the top-level ``layer {}`` (or V1 ``layers {}``) block holding the
    1-based ``line``/``column`` where the parser stopped, read from the block's own fields
    (not those of nested messages); None outside a layer. '?' for a field not written."""
    starts = [0] + [m.end() for m in re.finditer(r"\n", text)]
    if not 0 < line <= len(starts):
        return None
    stop = starts[line - 1] + max(column - 1, 0)
    tokens = [(m.lastgroup, m.group(), m.start()) for m in _TOKEN.finditer(text)]
    depth, block, after_layer_word = 0, None, False
    for index, (kind, value, offset) in enumerate(tokens):
        if offset >= stop:
            break
        if kind == "comment":
            continue
        if kind == "open":
            if depth == 0:
                block = index if after_layer_word else None
            depth += 1
        elif kind == "close":
            depth = max(depth - 1, 0)
            if depth == 0:
                block = None
        if kind != "colon":
            after_layer_word = depth == 0 and kind == "word" and value in ("layer", "layers")
    if block is None or depth == 0:
        return None
    found: Dict[str, str] = {}
    depth = 0
    fields = [t for t in tokens[block:] if t[0] != "comment"]
    for index, (kind, value, _) in enumerate(fields):
        if kind == "open":
            depth += 1
        elif kind == "close":
            depth -= 1
            if depth == 0:
                break
        elif depth == 1 and kind == "word" and value in ("name", "type") and value not in found \
                and index + 2 < len(fields) and fields[index + 1][0] == "colon" \
                and fields[index + 2][0] in ("string", "word"):
            raw = fields[index + 2][1]
            found[value] = raw[1:-1] if fields[index + 2][0] == "string" else raw
    return found.get("name", "?"), found.get("type", "?")


def _explain(detail: str, root: pb_message.Message) -> Tuple[str, Optional[str]]:
    pool = root.DESCRIPTOR.file.pool
    match = _UNKNOWN_FIELD.search(detail)
    if match:
        full_name, field = match.groups()
        descriptor = pool.FindMessageTypeByName(full_name)
        return (f"{descriptor.name} has no field '{field}'",
                _field_hint(descriptor, field, root))
    match = _UNKNOWN_ENUM_NAME.search(detail) or _UNKNOWN_ENUM_NUMBER.search(detail)
    if match:
        full_name, value = match.groups()
        enum = pool.FindEnumTypeByName(full_name)
        names = [v.name for v in enum.values]
        what = f"{_short_name(enum)} has no value '{value}'"
        close = difflib.get_close_matches(value.upper(), names, n=1, cutoff=0.6)
        valid = "valid values: " + ", ".join(names)
        hint = f"did you mean '{close[0]}'? {valid}" if close else valid
        if enum.full_name == "caffe.V1LayerParameter.LayerType":
            # Forks added their own values to this enum (DeepLab's IMAGE_SEG_DATA and INTERP,
            # C3D's CONVOLUTION3D and VIDEO_DATA); BVLC's parser rejects them as we do.
            hint = (f"if '{value}' is not a typo, it is a layer type that a Caffe fork added "
                    "to the V1 enum (DeepLab's IMAGE_SEG_DATA, C3D's CONVOLUTION3D...); "
                    "pycaffe_alt does not implement it: remove or replace that layer (a data "
                    "layer by input: and input_shape fields) to read the net. " + hint)
        return what, hint
    match = _DUPLICATE.search(detail)
    if match:
        full_name, field = match.groups()
        return (f"{full_name.split('.')[-1]} field '{field}' is given more than once",
                f"'{field}' holds a single value; remove the repeated line")
    match = _EXPECTED_STRING.search(detail)
    if match:
        token = match.group(1)
        hint = f"string values are quoted: \"{token}\""
        v1_type = _v1_type_string(token)
        if v1_type is not None:
            hint = (f"{token} is the old V1 enum form; inside layer {{}} write "
                    f"type: \"{v1_type}\" (or keep the whole file in the old layers {{}} form)")
        return f"expected a quoted string, found {token}", hint
    what = detail.rstrip(".")
    hint = None
    if 'Expected "}"' in detail or "got }" in detail or "Expected identifier" in detail:
        hint = "check that every '{' has a matching '}' and that fields are written name: value"
    elif 'Expected ":"' in detail:
        hint = "a value field is written name: value (one value per line, or name: [a, b])"
    return what[:1].lower() + what[1:] if what else "cannot parse the file", hint


def _field_hint(descriptor, field: str, root: pb_message.Message) -> Optional[str]:
    names = [f.name for f in descriptor.fields]
    if field in _LEGACY_FIELD_HINTS:
        return _LEGACY_FIELD_HINTS[field]
    # A net file given as a solver (or the reverse) fails on its first field; say so.
    if descriptor.full_name == "caffe.SolverParameter" and \
            field in caffe_pb2.NetParameter.DESCRIPTOR.fields_by_name:
        return "this looks like a net prototxt; a solver names it with net: \"path\""
    if descriptor.full_name == "caffe.NetParameter" and \
            field in caffe_pb2.SolverParameter.DESCRIPTOR.fields_by_name:
        return "this looks like a solver prototxt, not a net"
    close = difflib.get_close_matches(field, names, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    if len(names) <= 25:
        return f"{descriptor.name} accepts: " + ", ".join(names)
    return f"see {descriptor.full_name} in pycaffe_alt/proto/caffe.proto for its fields"


def _short_name(enum) -> str:
    # caffe.PoolingParameter.PoolMethod -> PoolingParameter.PoolMethod
    return enum.full_name.split(".", 1)[-1]


def _v1_type_string(token: str) -> Optional[str]:
    try:
        value = caffe_pb2.V1LayerParameter.LayerType.Value(token)
    except ValueError:
        return None
    return upgrade.V1_LAYER_TYPES.get(value) or None
