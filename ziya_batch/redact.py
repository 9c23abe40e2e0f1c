"""Secrets kept out of what is shown: a URL's password (or a lone token in its user part) and its secret query
values become ***, wherever a URL is shown (an error line, a log, a status, an HTTP answer); the scheme, user
name, host, port, bucket and path stay, so a reader still sees which location failed.

The user part is read as urllib and redis-py read it: it ends at the last '@' before the first '/', '?' or '#'
after `scheme://` (so a password holding '@' is masked whole), and the scheme in any case (`REDIS://`).
A user part without ':' is masked whole too: `https://TOKEN@host` carries a token where a user name would be.
Where what precedes the first '/' is no host[:port] (`redis://:pa/ss@host`: a password holding a '/' that was not
percent-encoded), the user part runs to the last '@' before any '?' or '#'; with no '@' left (a URL cut short
where a message shortened it) the part after its ':' is masked.
"""
from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Mapping
from typing import Optional

MASK = "***"
# a message's example of the form (`redis://:PASSWORD@host:port/0`) is no secret: shown as written
_PLACEHOLDERS = frozenset({"password", MASK})

_URL_HEAD = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<netloc>[^/?#]*)")
# query keys whose values are credentials: passwords, tokens, pre-signed URLs' signatures (S3, GCS, Azure SAS)
_HOST_PORT = re.compile(r"(?:\[[^\]]*\]|[^:\[\]]*)(?::\d+)?")       # host[:port], :port, or nothing
_UP_TO_LAST_AT = re.compile(r"[^?#]*@")
_SECRET_QUERY = re.compile(
    r"(?i)(?<=[?&;])(?P<key>[A-Za-z0-9_.\-]*(?:password|passwd|secret|token|signature|credential|api[_-]?key"
    r"|access[_-]?key)|sig|pwd)=(?P<value>[^&#;\s]*)")
# a URL inside free text: scheme:// up to whitespace or a quote or bracket that ends it in prose and reprs
_URL_IN_TEXT = re.compile(r"(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]*")
_PROSE_END = ".,;:!?)]}"


def _userinfo(url: str) -> Optional[tuple[str, str, str, str]]:
    """(scheme, user part, host part, the rest) of a URL with a user part, or None. A user part that was cut
    off with the text it sat in (`s3://KEY:SECRET`, no '@' left) is its whole authority when that is no
    host[:port]."""
    head = _URL_HEAD.match(url)
    if head is None:
        return None
    netloc, rest = head["netloc"], url[head.end():]
    if "@" not in netloc and not _HOST_PORT.fullmatch(netloc):
        cut = _UP_TO_LAST_AT.match(rest)
        if cut is None:
            # `host:` (an empty port) hides nothing; `KEY:SECR` is what was left of a cut `KEY:SECRET@host`
            return (head["scheme"], netloc, "", rest) if netloc.partition(":")[2] else None
        netloc, rest = netloc + cut.group(0), rest[cut.end():]
    if "@" not in netloc:
        return None
    userinfo, _, host = netloc.rpartition("@")
    return head["scheme"], userinfo, "@" + host, rest


def has_userinfo(url: str) -> bool:
    """Whether a URL carries a user part (`user:password@`, `token@`) before its host."""
    return _userinfo(url) is not None


def mask_url(url: Optional[str]) -> str:
    """The URL as it may be shown: the password of its user part (all of a user part without one) and the
    values of secret query keys (`password=`, `token=`, `X-Amz-Signature=`, `sig=`...) as ***."""
    if not url:
        return str(url)
    found = _userinfo(url)
    if found is not None:
        scheme, userinfo, host, rest = found
        user, colon, secret = userinfo.partition(":")
        if not (colon and secret.lower() in _PLACEHOLDERS):
            url = f"{scheme}{f'{user}:{MASK}' if colon else MASK}{host}{rest}"
    if "=" in url:
        url = _SECRET_QUERY.sub(lambda m: f"{m['key']}={MASK}", url)
    return url


def mask_text(text: str) -> str:
    """`text` with every URL in it shown through mask_url (an error message that quotes a URL it was given)."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(_mask_found, text)


def _mask_found(found: re.Match) -> str:
    # punctuation that ends a sentence or a bracket is prose, not the URL's (`at redis://h:1: refused`)
    url = found.group(0)
    core = url.rstrip(_PROSE_END)
    return mask_url(core) + url[len(core):]


_masking_logs = False


def mask_logs() -> None:
    """From now on every log record this process makes is shown masked (mask_text): its message (an exception given
    as one too), or the string and exception values it is formatted with (in a tuple or a mapping), and its
    traceback, so a password or a pre-signed URL's signature in an exception's text reaches no log. A record's
    arguments keep their number and kinds where they are no exceptions (formatters such as uvicorn's access log
    unpack them). Installed once; later calls do nothing."""
    global _masking_logs
    if _masking_logs:
        return
    _masking_logs = True
    make = logging.getLogRecordFactory()

    def masked(*args, **kwargs) -> logging.LogRecord:
        record = make(*args, **kwargs)
        if not record.args:
            # a message of another kind (`log.error(err)`) is shown as its str()
            record.msg = _masked_arg(record.msg) if isinstance(record.msg, (str, BaseException)) else record.msg
        elif isinstance(record.args, tuple):
            record.args = tuple(_masked_arg(a) for a in record.args)
        elif isinstance(record.args, Mapping):      # one mapping: `log.info("%(where)s", {"where": ...})`
            record.args = {k: _masked_arg(v) for k, v in record.args.items()}
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            record.exc_text = masked_traceback(record.exc_info[1])
        return record

    logging.setLogRecordFactory(masked)


def masked_traceback(err: BaseException) -> str:
    """err's traceback as Python prints it (without the last newline), every URL in it masked."""
    return mask_text("".join(traceback.format_exception(err))).rstrip("\n")


def _masked_arg(value):
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, BaseException):
        return mask_text(str(value))
    return value
