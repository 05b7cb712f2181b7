"""Strict readers of the single values of a service policy (`mesh_services`) and of a host's zone: durations in
milliseconds, percentages, counts, HTTP header and cookie names, path matches, RE2 regexes, methods.

Each takes a value and returns it typed or raises BadValue saying what was expected; none knows files or keys.
The inventory reader and the canonical JSON reader (mesh/inventory/services.py) both use them.
"""

from __future__ import annotations

import math
import re
import re._constants as re_constants  # Python's own parse tree of a pattern: the RE2 program size estimate
import re._parser as re_parser
import warnings
from typing import Any

from mesh.inventory.values import BadValue, describe, duration_millis, has_control_characters

MAX_DURATION_MS = 86_400_000  # 24h: longer than any sensible timeout, ejection or interval
MAX_COUNT = 4_294_967_295  # Envoy's uint32 thresholds
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
MAX_TEXT = 1024  # header values, paths, regexes

_PERCENT = re.compile(r"\s*(\d{1,3}(?:\.\d{1,9})?)\s*%?\s*", re.ASCII)
_DIGITS = re.compile(r"0|[1-9]\d{0,18}", re.ASCII)
# RFC 9110 token: what a header (and RFC 6265 a cookie) name is made of.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,256}", re.ASCII)
# RFC 6265 cookie-octet: printable ASCII less space, '"', ',', ';' and '\'.
_COOKIE_VALUE = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]{1,1024}", re.ASCII)
# A URL path as a request carries it: '/', then printable ASCII with no space (a query may follow '?').
_PATH = re.compile(r"/[\x21-\x7e]{0,1023}", re.ASCII)
_ZONE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", re.ASCII)
_RE2_FLAGS = set("imsU")
_POSIX_CLASS = re.compile(r"\^?(alnum|alpha|ascii|blank|cntrl|digit|graph|lower|print|punct|space|upper|word|xdigit)",
                          re.ASCII)
RE2_MAX_PROGRAM_SIZE = 100  # Envoy's default error level for a regex's program size (runtime re2.max_program_size)


def parse_millis(value: Any) -> int:
    """A duration longer than zero and at most 24h, written with units (`500ms`, `2s`, `1.5s`, `1m30s`, `1h`),
    in whole milliseconds."""
    expected = "a duration such as 500ms, 2s or 1m30s (units h, m, s, ms), longer than zero and at most 24h"
    if not isinstance(value, str) or not value.strip():
        hint = "; write the unit, such as 2s" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
        raise BadValue(f"expected {expected}, got {describe(value)}{hint}")
    total = duration_millis(value.strip(), largest="h")
    if total is None:
        raise BadValue(f"expected {expected}, got {value!r}")
    if total != int(total):
        raise BadValue(f"expected a whole number of milliseconds, got {value!r}")
    if total <= 0:
        raise BadValue(f"expected a duration longer than zero, got {value!r}")
    if total > MAX_DURATION_MS:
        raise BadValue(f"expected a duration of at most 24h, got {value!r}")
    return int(total)


def millis_text(milliseconds: int) -> str:
    """The canonical way to write a duration: `<n>ms`."""
    return f"{milliseconds}ms"


def parse_percent(value: Any) -> float:
    """A percentage from 0 to 100: a number (5, 5.5) or a string of one with an optional '%' ("5%", "5.5"); at
    most 4 decimals (Envoy counts fractions per million)."""
    expected = "a percentage from 0 to 100 such as 5, 5.5 or \"5%\""
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value) if not isinstance(value, int) or abs(value) <= 10**6 else None
    elif isinstance(value, str):
        match = _PERCENT.fullmatch(value)
        number = float(match.group(1)) if match else None
    if number is None or not math.isfinite(number):
        raise BadValue(f"expected {expected}, got {describe(value)}")
    if not 0 <= number <= 100:
        raise BadValue(f"expected {expected}, got {describe(value)}, out of range")
    if abs(number * 10_000 - round(number * 10_000)) > 1e-6:
        raise BadValue(f"expected a percentage with at most 4 decimals (Envoy counts per million), got {describe(value)}")
    return number


def percent_json(percent: float) -> int | float:
    """A percentage as the canonical JSON writes it: an integer when it is one."""
    return int(percent) if percent == int(percent) else percent


def parse_count(value: Any, low: int = 0, high: int = MAX_COUNT) -> int:
    """An integer from low to high, or a string of its digits with no leading zero (INI gives strings); a
    boolean is not an integer."""
    expected = f"an integer from {low} to {high}"
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        number = int(value.strip())
    if number is None:
        raise BadValue(f"expected {expected}, got {describe(value)}")
    if not low <= number <= high:
        raise BadValue(f"expected {expected}, got {number if abs(number) < 10**12 else describe(value)}, "
                       "out of range")
    return number


def check_header_name(value: Any) -> str:
    """An HTTP header name (an RFC 9110 token), lower-cased as HTTP/2 and Envoy write it."""
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise BadValue(f"expected an HTTP header name such as x-canary (letters, digits and !#$%&'*+-.^_`|~), "
                       f"got {describe(value)}")
    return value.lower()


def check_cookie_name(value: Any) -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise BadValue(f"expected a cookie name such as session (letters, digits and !#$%&'*+-.^_`|~), "
                       f"got {describe(value)}")
    return value


def check_header_value(value: Any) -> str:
    """A header value to match exactly: a string (a YAML integer is read as its digits), printable, at most 1024
    characters; booleans are refused (YAML reads `yes` as true: quote it)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10**18:
        value = str(value)
    if (not isinstance(value, str) or not value or len(value) > MAX_TEXT or has_control_characters(value)
            or value != value.strip()):
        hint = " (quote it: YAML reads yes, no, true and false as booleans)" if isinstance(value, bool) else ""
        raise BadValue(f"expected a header value: a non-empty string with no control characters and no space at "
                       f"either end, at most {MAX_TEXT} characters, got {describe(value)}{hint}")
    return value


def check_cookie_value(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10**18:
        value = str(value)
    if not isinstance(value, str) or not _COOKIE_VALUE.fullmatch(value):
        raise BadValue(f"expected a cookie value: printable characters with no space, '\"', ',', ';' or '\\', "
                       f"got {describe(value)}")
    return value


def check_path(value: Any) -> str:
    """A path to match by prefix or exactly: '/', then printable ASCII with no space, at most 1024."""
    if not isinstance(value, str) or not _PATH.fullmatch(value):
        raise BadValue(f"expected a URL path starting with '/' (printable characters, no space), got {describe(value)}")
    return value


def check_regex(value: Any) -> str:
    """A regular expression Envoy's RE2 compiles: Python's re compiles it first (a first filter), then the
    constructs RE2 lacks are refused: backreferences, lookaround, atomic groups, possessive quantifiers,
    conditionals, \\Z and inline flags other than i, m, s, U."""
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT or has_control_characters(value):
        raise BadValue(f"expected a regular expression (RE2 syntax, at most {MAX_TEXT} characters), "
                       f"got {describe(value)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "possible nested set" for RE2's [[:alpha:]]: fine there
            re.compile(value)
    except (re.error, RecursionError, OverflowError) as exc:
        raise BadValue(f"expected a regular expression, got {value!r}: {exc}") from None
    lacking = _re2_lacks(value)
    if lacking:
        raise BadValue(f"expected a regular expression RE2 (Envoy's engine) accepts, got {value!r}: RE2 has no "
                       f"{lacking}")
    size = re2_program_size(value)
    if size > RE2_MAX_PROGRAM_SIZE:
        raise BadValue(f"expected a regular expression Envoy accepts, got {value!r}: its RE2 program would have "
                       f"about {size} instructions, Envoy refuses more than {RE2_MAX_PROGRAM_SIZE} (repeat less, "
                       "such as [0-9]+ for [0-9]{1,200})")
    return value


def re2_program_size(pattern: str) -> int:
    """About how many instructions RE2 compiles pattern into (Envoy refuses more than RE2_MAX_PROGRAM_SIZE),
    from Python's parse of it: counted repetitions copy their item, '.', negated classes and \\w, \\s match
    several UTF-8 byte ranges. It errs on the large side."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _re2_size(re_parser.parse(pattern)) + 4
    except (re.error, RecursionError, OverflowError, AttributeError, TypeError, ValueError):
        return 0  # Python's re refused it already, or its parser changed: Envoy's validation has the last word


def _re2_size(items: Any) -> int:
    total = 0
    for op, argument in items:
        if op is re_constants.SUBPATTERN:
            group, _, _, inner = argument
            total += _re2_size(inner) + (2 if group else 0)
        elif op in (re_constants.MAX_REPEAT, re_constants.MIN_REPEAT):
            low, high, inner = argument
            size = _re2_size(inner)
            total += size * max(low, 1) + 1 if high == re_constants.MAXREPEAT else size * max(high, 1) + high - low
        elif op is re_constants.BRANCH:
            total += sum(_re2_size(branch) for branch in argument[1]) + len(argument[1]) - 1
        elif op is re_constants.IN:
            total += sum(_atom_size(item) for item in argument)
        else:
            total += _atom_size((op, argument))
    return total


# Instructions per class of characters, measured with Envoy (UTF-8: the wide classes match several byte ranges).
_CATEGORY_SIZE = {"CATEGORY_DIGIT": 1, "CATEGORY_NOT_DIGIT": 2, "CATEGORY_WORD": 3, "CATEGORY_NOT_WORD": 5,
                  "CATEGORY_SPACE": 3, "CATEGORY_NOT_SPACE": 4}


def _atom_size(item: Any) -> int:
    """The instructions of one character (or class part); a negated part or '.' spans the bytes of UTF-8."""
    op, argument = item
    if op is re_constants.LITERAL:
        return len(chr(argument).encode("utf-8", "surrogatepass"))
    if op is re_constants.RANGE:
        return 1 if argument[1] < 0x80 else 4
    if op is re_constants.CATEGORY:
        return _CATEGORY_SIZE.get(str(argument), 5)
    if op is re_constants.NEGATE:
        return 1
    if op is re_constants.NOT_LITERAL:
        return 1 + len(chr(argument).encode("utf-8", "surrogatepass"))
    if op is re_constants.ANY:
        return 2
    return 1


def _re2_lacks(pattern: str) -> str | None:
    """The first construct of pattern that RE2 lacks, named, or None. Character classes are skipped."""
    index, in_class = 0, False
    while index < len(pattern):
        char = pattern[index]
        following = pattern[index + 1:index + 4]
        if char == "\\":
            escaped = following[:1]
            if escaped.isdigit() and escaped != "0":
                return f"backreferences or octal escapes ({char}{escaped})"
            if escaped in ("u", "U", "N"):
                return f"\\{escaped} escapes (write \\x{{E9}} for a code point)"
            if in_class and escaped == "b":
                return "\\b inside [...] (Python reads a backspace there)"
            if not in_class and escaped == "Z":
                return "\\Z (write $)"
            index += 2
            continue
        if in_class and pattern.startswith("[:", index) and ":]" in pattern[index + 2:]:
            # RE2 reads `[:name:]` up to the next ":]" as a POSIX class, whatever lies between.
            end = pattern.index(":]", index + 2)
            if not _POSIX_CLASS.fullmatch(pattern[index + 2:end]):
                return f"POSIX class {pattern[index:end + 2]!r} (RE2 knows [:alpha:], [:digit:], ...)"
            index = end + 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            # A ']' right after '[' or '[^' is a literal, not the end of the class.
            index += 2 if pattern[index + 1:index + 2] == "]" else 3 if pattern[index + 1:index + 3] == "^]" else 1
            continue
        elif char == "(" and following.startswith("?"):
            lacking = _re2_lacks_group(following[1:])
            if lacking:
                return lacking
        elif char in "*+?}" and following[:1] == "+":
            return f"possessive quantifiers ({char}+)"
        index += 1
    return None


def _re2_lacks_group(after: str) -> str | None:
    """What a `(?` group starting with `after` is, when RE2 lacks it."""
    if after[:1] in ("=", "!") or after[:2] in ("<=", "<!"):
        return "lookaround ((?=, (?!, (?<=, (?<!)"
    if after[:1] == ">":
        return "atomic groups ((?>...)"
    if after[:2] == "P=":
        return "backreferences ((?P=name))"
    if after[:2] == "P<":
        return None  # a named group
    if after[:1] == "(":
        return "conditionals ((?(...)...)"
    if after[:1] == "#":
        return "comments ((?#...))"
    flags = re.match(r"[a-zA-Z-]*", after)
    letters = set(flags.group(0).replace("-", "")) if flags else set()
    if letters - _RE2_FLAGS:
        return f"inline flag(s) {''.join(sorted(letters - _RE2_FLAGS))} (RE2 knows i, m, s and U)"
    return None


def check_method(value: Any) -> str:
    """An HTTP method, upper-cased."""
    if not isinstance(value, str) or value.upper() not in HTTP_METHODS:
        raise BadValue(f"expected an HTTP method ({', '.join(HTTP_METHODS)}), got {describe(value)}")
    return value.upper()


def check_zone(value: Any) -> str:
    """`mesh_zone` and `mesh_region`: letters, digits, '-', '_' and '.', at most 63, a letter or digit first (it
    goes into Consul Meta and Envoy's localities)."""
    if not isinstance(value, str) or not _ZONE.fullmatch(value):
        raise BadValue(f"expected a name such as eu-west-1a (letters, digits, '-', '_', '.', at most 63, a letter "
                       f"or digit first), got {describe(value)}")
    return value
