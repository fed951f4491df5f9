"""Prompts from users: lists in a config and prompt files, checked once, where they come in.

A prompt is a str of at most ``MAX_PROMPT_CHARS`` characters with something visible in it. A
prompt file is UTF-8 text, one prompt per line (blank lines skipped), and holds at least one
prompt. Every error names the source and the line or index, so a bad file is one readable line
at startup and never a failure in an actor after training has begun.
"""

from __future__ import annotations

import stat
import unicodedata
from collections.abc import Sequence
from pathlib import Path

#: Longest prompt accepted (a T5 encoder reads 512 tokens, about 2000 characters of English).
MAX_PROMPT_CHARS = 4096
#: Largest prompt file read (a million short prompts).
MAX_PROMPT_FILE_BYTES = 256 * 2**20
#: Characters that show nothing: controls, format characters (zero-width), separators.
_INVISIBLE = {"Cc", "Cf", "Zs", "Zl", "Zp"}


def shown(prompt: str, limit: int = 60) -> str:
    """``prompt`` quoted for a message, cut to ``limit`` characters: a message is one readable
    line, and a file read by mistake (an environment, a key) is not echoed whole."""
    return repr(prompt) if len(prompt) <= limit else f"{prompt[:limit]!r}... ({len(prompt)} characters)"


def _control(prompt: str) -> str | None:
    """What is wrong with a prompt that holds a control character (a NUL-separated file read as
    one prompt, a terminal's escape codes), or None; a tab is a space."""
    at = next((i for i, ch in enumerate(prompt) if unicodedata.category(ch) == "Cc" and ch != "\t"), None)
    return None if at is None else f"holds a control character ({prompt[at]!r} at {at + 1}): {shown(prompt)}"


def _visible(prompt: str) -> bool:
    return any(unicodedata.category(ch) not in _INVISIBLE for ch in prompt)


def check_prompts(prompts: Sequence[object], source: str = "", what: str = "prompt") -> list[str]:
    """``prompts`` as a list of str, or a ValueError naming ``source`` (if given) and the bad entry."""
    out = []
    for i, p in enumerate(prompts):
        where = f"{source}: {what} {i + 1}" if source else f"{what} {i + 1}"
        if not isinstance(p, str):
            raise ValueError(f"{where} is {type(p).__name__}, not text")
        if len(p) > MAX_PROMPT_CHARS:
            raise ValueError(f"{where} has {len(p)} characters; the limit is {MAX_PROMPT_CHARS}")
        if not _visible(p):
            raise ValueError(f"{where} is empty or holds only invisible characters ({shown(p)})")
        if control := _control(p):
            raise ValueError(f"{where} {control}")
        out.append(p)
    if not out:
        raise ValueError(f"{source or 'the list'} holds no {what}")
    return out


def read_capped(path: Path, what: str, limit: int, hint: str = "") -> bytes:
    """The bytes of a file a user names (a ``what``: 'config file', 'prompt file'), or a
    ValueError naming it where it cannot be one: not a regular file (a directory; a FIFO would
    block the read, a device never end it), or over ``limit`` bytes (``hint`` added; nothing
    beyond the limit is read). A missing file raises FileNotFoundError, for the caller to word."""
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        kind = "it is a directory" if stat.S_ISDIR(mode) else "a device, a FIFO or a socket"
        raise ValueError(f"{what} {path} is not a regular file ({kind})")
    with path.open("rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{what} {path} is larger than {limit // 2**20} MiB{hint}")
    return data


def read_prompt_file(path: Path | str) -> list[str]:
    """The prompts of a UTF-8 text file, one per line, blank lines skipped; checked as above. A
    byte-order mark at its start (a file saved by Notepad) is not part of its first prompt."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"prompt file {path} does not exist")
    data = read_capped(path, "prompt file", MAX_PROMPT_FILE_BYTES)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"prompt file {path} is not UTF-8 text (byte {e.start}, line {line})") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    kept = [(n, p) for n, p in lines if p and _visible(p)]
    for n, p in lines:
        if p and not _visible(p):
            raise ValueError(f"prompt file {path}: line {n} holds only invisible characters ({shown(p)})")
    for n, p in kept:
        if control := _control(p):
            raise ValueError(f"prompt file {path}: line {n} {control}")
        if len(p) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt file {path}: line {n} has {len(p)} characters; the limit is {MAX_PROMPT_CHARS}")
    if not kept:
        raise ValueError(f"prompt file {path} holds no prompt")
    return [p for _, p in kept]
