"""Reading a user's script, novel or character sheet as text, with its encoding detected and named.

Why: the texts people have for a character are plain files from many places. Chinese novels and scripts are very
often GB18030/GBK rather than UTF-8, and a wrong guess would silently turn every name into mojibake, so the
decoding is strict: UTF-8 (with or without a BOM) first, then GB18030 (named GBK when GBK alone decodes it), and
anything else is refused with the byte offset where UTF-8 decoding failed. Binary files (NUL bytes, control
characters) and empty files are refused before any guess.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from persona_lora.errors import SourceFileError

_ALLOWED_CONTROLS = {0x09, 0x0A, 0x0C, 0x0D}


@dataclass(frozen=True)
class SourceText:
    """A decoded source file and what its provenance needs."""

    path: Path
    text: str  # newlines normalized to \n, BOM removed
    encoding: str  # "UTF-8" | "UTF-8 with BOM" | "GBK" | "GB18030"
    sha256: str  # of the file's bytes
    size: int  # bytes


def read_source_text(path: str | Path) -> SourceText:
    """The file's text, or a SourceFileError naming the file, the problem (with a byte offset) and the fix."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SourceFileError(f"{path} does not exist or is not a file; fix: give the path of a text file")
    raw = path.read_bytes()
    text, encoding = decode_source_bytes(raw, str(path))
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return SourceText(path, text, encoding, hashlib.sha256(raw).hexdigest(), len(raw))


def decode_source_bytes(raw: bytes, name: str) -> tuple[str, str]:
    """(text, encoding name) of `raw`; a SourceFileError for empty, binary, UTF-16/32 or undecodable bytes."""
    if not raw.strip():
        raise SourceFileError(f"{name} is empty (no text at all); fix: give the script or novel file itself")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise SourceFileError(f"{name} starts with a UTF-16/UTF-32 byte-order mark (byte offset 0); only UTF-8 and "
                        "GB18030/GBK are read; fix: save the file as UTF-8")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise SourceFileError(f"{name} is a binary file, not text (NUL byte at byte offset {nul}); fix: give a "
                              "plain-text script or novel (.txt), not a document, archive or image")
    if raw.startswith(b"\xef\xbb\xbf"):
        text = _strict(raw[3:], "utf-8", name, offset=3)
        return _checked(text, name), "UTF-8 with BOM"
    try:
        return _checked(raw.decode("utf-8"), name), "UTF-8"
    except UnicodeDecodeError as utf8_error:
        for encoding, shown in (("gbk", "GBK"), ("gb18030", "GB18030")):
            try:
                return _checked(raw.decode(encoding), name), shown
            except UnicodeDecodeError:
                continue
        start = utf8_error.start
        raise SourceFileError(f"{name}: not UTF-8 (invalid byte 0x{raw[start]:02x} at byte offset {start}) and not "
                        "GB18030/GBK either; fix: save the file as UTF-8 (most editors: Save As → Encoding: "
                        "UTF-8)") from None


def _strict(raw: bytes, encoding: str, name: str, *, offset: int) -> str:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise SourceFileError(f"{name}: starts with a UTF-8 byte-order mark but is not UTF-8 (invalid byte 0x"
                        f"{raw[e.start]:02x} at byte offset {e.start + offset}); fix: save the file as UTF-8") from None


def _checked(text: str, name: str) -> str:
    """Refuse text whose control characters say it is not text (a decoder can accept many binary formats)."""
    bad = [i for i, ch in enumerate(text[:65536]) if ord(ch) < 0x20 and ord(ch) not in _ALLOWED_CONTROLS]
    if len(bad) > max(2, len(text[:65536]) // 1000):
        raise SourceFileError(f"{name} looks binary, not text ({len(bad)} control characters, the first at character "
                        f"{bad[0]}); fix: give a plain-text script or novel (.txt)")
    return text
