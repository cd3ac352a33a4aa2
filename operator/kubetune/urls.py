"""The one rule for every URL-valued field, and the one redaction for every message (pure,
stdlib only: the API models, the CLI, the operator and the trainer all use it).

The rule is structural, not a list of names: in a ``scheme://`` value (a source, an output, a
tracking server, a reward model or module path)

- what comes before the path is a plain host and port (``[A-Za-z0-9._~-]*`` and ``:digits``):
  no user-info (``user:pass@``), no percent-encoded user-info (``u%3Ap%40host``);
- no fragment (``#…``): it is never sent to a server, so it only ever carries a token;
- a query only of ``SAFE_QUERY``: ``download``, ``dl`` or ``raw`` set to ``0``, ``1``, ``true`` or
  ``false`` (what file hosts use to serve the raw file). Any other parameter, whatever its name
  and however it is encoded, may carry a credential and is refused: a revision has its own
  field, credentials go in a Secret named by ``secretRef``.

An image reference (``trainer.image``, ``serve.image``) has no ``@`` but a digest at its end
(``@sha256:…``) and no ``?``, ``#`` or ``%``: registry credentials go in an image pull secret.

``CLEAN_URL`` and ``CLEAN_IMAGE`` are the same rules as regular expressions that Python's re, Go's
RE2 and CEL read alike (the CRD's CEL rules use them; a test checks both agree).
"""

from __future__ import annotations

import re

# A value with a scheme; a bare path (local, relative to the job file) has none.
HAS_SCHEME = "^[A-Za-z0-9+.-]+://"
_HOST = "[A-Za-z0-9._~-]*(:[0-9]{1,5})?"
_PARAM = "(download|dl|raw)=(0|1|true|false)"
SAFE_QUERY = f"(?i)^{_PARAM}([&]{_PARAM})*$"
# No backslashes: the pattern goes into CEL string literals as it is.
CLEAN_URL = f"(?i)^[A-Za-z0-9+.-]+://{_HOST}([/][^?#]*)?([?]{_PARAM}([&]{_PARAM})*)?$"
CLEAN_IMAGE = "^[^@?#%]+(@[A-Za-z0-9_+.-]+:[A-Fa-f0-9]{32,})?$"

_PARTS = re.compile(r"^([A-Za-z0-9+.-]+)://([^/?#]*)([^?#]*)(?:\?([^#]*))?(?:#(.*))?$", re.S)
_IMAGE_DIGEST = re.compile(r"@[A-Za-z0-9_+.-]+:[A-Fa-f0-9]{32,}$")

USERINFO = "userinfo"
QUERY = "query"
FRAGMENT = "fragment"
# An hf:// value names a Hub repository, hf://ORG/NAME, then (a source) a path inside it. ORG
# and NAME: 1 to 96 letters, digits, '_', '-' and '.', starting and ending with a letter, a digit
# or '_', no two of '-' and '.' in a row (so no '--' or '..'), no '.git' at the end: what
# huggingface_hub's validate_repo_id accepts (a little stricter: no '-.'), so the Hub client never
# refuses a repository id the spec let through. Three RE2 patterns (CEL has no lookaround).
_HF_PART = "[A-Za-z0-9_]+([-.][A-Za-z0-9_]+)*"
HF_REPO = f"^hf://{_HF_PART}/{_HF_PART}([/?#].*)?$"
HF_REPO_LENGTH = "^hf://[^/?#]{1,96}/[^/?#]{1,96}([/?#].*)?$"
HF_REPO_GIT = "^hf://[^/?#]*/[^/?#]*[.][Gg][Ii][Tt]([/?#].*)?$"  # must not match


def hf_problem(value: str | None) -> bool:
    """Whether ``value`` is an hf:// URL whose ORG/NAME is not a Hub repository id."""
    if not value or not value.startswith("hf://"):
        return False
    return not (re.fullmatch(HF_REPO, value) and re.fullmatch(HF_REPO_LENGTH, value)
                and not re.fullmatch(HF_REPO_GIT, value))


def hf_message(field: str) -> str:
    return (f"{field}: an hf:// location is hf://ORG/NAME (a source may add /path inside it), "
            "ORG and NAME each 1 to 96 letters, digits, '_', '-' or '.', starting and ending "
            "with a letter, digit or '_', without '--', '..' or a '.git' ending")


def url_problem(value: str | None) -> str | None:
    """USERINFO, QUERY or FRAGMENT when ``value`` (a ``scheme://`` URL) may carry a
    credential, None when it is clean or not a URL. Agrees with ``CLEAN_URL``."""
    if not value or not re.match(HAS_SCHEME, value):
        return None
    m = _PARTS.match(value)
    if m is None:  # only when a line break hides the rest
        return USERINFO
    _, authority, _, query, fragment = m.groups()
    if not re.fullmatch(_HOST, authority):
        return USERINFO
    if fragment is not None:
        return FRAGMENT
    if query is not None and not re.fullmatch(SAFE_QUERY, query):
        return QUERY
    return None


def image_problem(value: str | None) -> str | None:
    """USERINFO when an image reference carries anything but a digest after an ``@``, or a
    query, fragment or percent sign. Agrees with ``CLEAN_IMAGE``."""
    if not value or re.fullmatch(CLEAN_IMAGE, value):
        return None
    return USERINFO


def refusal(field: str, secret: str) -> str:
    """The refusal of a URL that may carry a credential: the field, why (never the value),
    and where the credential goes instead."""
    return (f"{field}: a user name, password or token in the URL (before the host, in the "
            "query or in a #fragment) would be stored and printed in the clear; only a host, "
            "a path and download/dl/raw=true|false|0|1 are allowed: put it in a Secret and "
            f"name it in {secret}")


def image_message(field: str, service_account: str) -> str:
    return (f"{field}: an image is [REGISTRY/]NAME[:TAG][@DIGEST]; a user name, password or "
            "token in it would be stored and printed in the clear: give the registry's "
            f"credentials as an image pull secret of {service_account}")


def redact(value: str) -> str:
    """``value`` fit to print: the user-info, every query parameter outside ``SAFE_QUERY``
    and the fragment replaced by ``***``; an image's part before a non-digest ``@`` too.
    Over-redacts rather than under: anything before the last ``@`` of the part before the
    query goes."""
    if not isinstance(value, str):
        return value
    m = _PARTS.match(value)
    if m is None:
        head, _, _ = value.partition("?")
        head = head.partition("#")[0]
        if "@" in head and not _IMAGE_DIGEST.search(head):
            return "***@" + value.rsplit("@", 1)[1].partition("?")[0].partition("#")[0] + (
                "?***" if "?" in value else "") + ("#***" if "#" in value else "")
        if "%" in value or "?" in value or "#" in value:
            return re.sub(r"[?#%].*", "***", value, flags=re.S)
        return value
    scheme, authority, path, query, fragment = m.groups()
    rest = authority + path
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    elif not re.fullmatch(_HOST, authority):
        rest = "***" + path
    out = f"{scheme}://{rest}"
    if query is not None:
        kept = [p for p in re.split("[&;]", query) if re.fullmatch(SAFE_QUERY, p)]
        hidden = len(kept) != len(re.split("[&;]", query))
        out += "?" + "&".join(kept + ["***"] * hidden)
    if fragment is not None:
        out += "#***"
    return out


_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")


def redact_text(text: str) -> str:
    """Every URL inside a message redacted (for messages that quote another library's
    error, and as the CLI's last net)."""
    return _IN_TEXT.sub(lambda m: redact(m.group(0)), text)


def _secret_parts(value: str) -> list[str]:
    """The pieces of ``value`` that ``redact`` hides, as they are and percent-decoded."""
    from urllib.parse import unquote

    m = _PARTS.match(value)
    if m is None:
        return [value.rsplit("@", 1)[0]] if "@" in value else []
    _, authority, path, query, fragment = m.groups()
    parts = []
    rest = authority + path
    if "@" in rest:
        parts.append(rest.rsplit("@", 1)[0])
    elif not re.fullmatch(_HOST, authority):
        parts.append(authority)
    if query is not None:
        bad = [p for p in re.split("[&;]", query) if not re.fullmatch(SAFE_QUERY, p)]
        parts += [query, *bad, *(p.partition("=")[2] for p in bad)]
    if fragment is not None:
        parts.append(fragment)
    parts += [unquote(p) for p in parts]
    return sorted({p for p in parts if len(p) >= 2}, key=len, reverse=True)


def scrub(text: str, *values: str | None) -> str:
    """``redact_text(text)``, and every secret piece of ``values`` (the URLs the message is
    about) removed wherever else it appears: a server that echoes a path and its query, a
    library that decodes the user-info."""
    out = redact_text(text)
    for value in values:
        for part in _secret_parts(value or ""):
            out = out.replace(part, "***")
    return out


# ------------------------------------------------------------------ credential-looking values
# A plain value (trainer.env[].value, serve.args[]) that looks like a credential, whatever the
# variable's name. Each is one regular expression (Python's re, RE2 and CEL alike, no
# backslashes); a value is refused when any matches (and, for a long token, it mixes upper
# and lower case letters and digits).
CREDENTIAL_VALUES = (
    # an Authorization header's value
    "(?i)(^|[^A-Za-z0-9])(bearer|basic|token)[ ]+[A-Za-z0-9+/=._~-]{8,}",
    # a connection string's password or key: Password=…; AccountKey=…
    "(?i)(^|[;, ])(password|pwd|passwd|accountkey|sharedaccesskey|sharedaccesssignature|"
    "secret|token|apikey|api_key|api-key|access_token|auth)=",
    # an argument that gives a key or token: --api-key=…, --hf-token (its value follows)
    "(?i)^--?[A-Za-z0-9_-]*(key|token|secret|password|passwd|pwd|credentials?|auth)(=|$)",
    # a URL with a user name or password (DATABASE_URL), or with a query or fragment
    "[A-Za-z0-9+.-]+://[^/?#@ ]*@",
    "[A-Za-z0-9+.-]+://[^ ?#]*[?#]",
    # a long hexadecimal key (W&B, many API keys)
    "(?i)(^|[^0-9a-f])[0-9a-f]{32,}($|[^0-9a-f])",
)
# A long random token: a run of 24+ token characters, in a value with upper and lower case
# letters and digits.
TOKEN_RUN = "[A-Za-z0-9+_=-]{24,}"
_MIXED = ("[A-Z]", "[a-z]", "[0-9]")


def credential_value(value: str | None) -> bool:
    """Whether a plain value looks like a credential (``CREDENTIAL_VALUES``, ``TOKEN_RUN``)."""
    if not value:
        return False
    if any(re.search(r, value) for r in CREDENTIAL_VALUES):
        return True
    return re.search(TOKEN_RUN, value) is not None and all(re.search(c, value) for c in _MIXED)


def credential_value_cel(expr: str) -> str:
    """CEL that is true when ``expr`` (a string) looks like a credential."""
    parts = [f"{expr}.matches('{r}')" for r in CREDENTIAL_VALUES]
    mixed = " && ".join(f"{expr}.matches('{r}')" for r in (TOKEN_RUN, *_MIXED))
    return "(" + " || ".join([*parts, f"({mixed})"]) + ")"
