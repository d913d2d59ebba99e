"""Hostile messages, generated with hypothesis, and the oracle that says what must happen.

Every generated message carries exactly one defect of a named ``kind``. The oracle
(``expected_reason``) applies the documented rules (README, "Dead letters"; the contracts
in ``shared.contracts``) in the consumer's documented order, independently of how the
consumer implements them, and names the dead-letter reason each consuming service must
give (None: the message is valid for that service and must be applied).

Generation is deterministic (``derandomize=True``, no example database): the same code
and hypothesis version give the same messages on every run.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.contracts import model_for

MAX_MESSAGE_BYTES = 262_144  # GRANTWIRE_MAX_MESSAGE_BYTES default
CASE_HEADER = "x-chaos-case"
ROUTES: dict[str, tuple[str, ...]] = {
    "user.signed_up": ("organizations", "invitations"),
    "user.email_verified": ("organizations",),
    "invitation.accepted": ("billing",),
    "organization.provisioned": ("billing",),
    "organization.created": ("billing",),
}
HANDLED: dict[str, frozenset[str]] = {
    "organizations": frozenset({"user.signed_up", "user.email_verified"}),
    "invitations": frozenset({"user.signed_up"}),
    "billing": frozenset(
        {"invitation.accepted", "organization.provisioned", "organization.created"}
    ),
}
TEMPLATES: dict[str, dict[str, Any]] = {
    "user.signed_up": {
        "user_id": "hostile-user",
        "email": "hostile@example.com",
        "first_name": "Hostile",
        "last_name": "",
        "email_verified": False,
        "invite_token": None,
    },
    "user.email_verified": {"user_id": "hostile-user"},
    "invitation.accepted": {
        "invitation_id": "hostile-invitation",
        "email": "hostile@example.com",
        "invited_by": "hostile-inviter",
        "accepted_user_id": "hostile-user",
    },
    "organization.provisioned": {"user_id": "hostile-user", "organization_id": "hostile-org"},
    "organization.created": {"organization_id": "hostile-org", "plan_id": "free"},
}
# fields with a length limit in the contracts (the others have none)
LIMITED = {
    "user.signed_up": {
        "user_id": 128,
        "email": 320,
        "first_name": 200,
        "last_name": 200,
        "invite_token": 128,
    },
    "user.email_verified": {"user_id": 128},
}
WRONG_CONTENT_TYPES = (
    "text/plain",
    "application/xml",
    "application/octet-stream",
    "text/html",
    "application/x-www-form-urlencoded",
    "multipart/form-data",
    "application/x-protobuf",
)
GOOD_DUPLICATE_IDS = tuple(f"dup-good-{k}" for k in range(5))  # also used by good messages


@dataclass(frozen=True)
class Hostile:
    """One bad message: AMQP properties, headers and body, and the defect's kind."""

    kind: str
    routing_key: str
    body: bytes
    message_id: str | None
    type: str | None
    headers: dict[str, Any] = field(default_factory=dict)
    content_type: str | None = "application/json"

    def header_text(self, name: str) -> str | None:
        value = self.headers.get(name)
        if value is None:
            return None
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# -- the oracle -----------------------------------------------------------------------------
def expected_reason(message: Hostile, service: str) -> str | None:
    """The dead-letter reason ``service`` must give ``message``; None when it is valid.

    Order (README, "Dead letters"): size, envelope (id, type, time), handler, major
    version, content type, JSON, schema.
    """
    if len(message.body) > MAX_MESSAGE_BYTES:
        return "oversize"
    if not (message.message_id or message.header_text("cloudEvents:id")):
        return "bad_envelope"
    event_type = message.header_text("cloudEvents:type") or message.type
    if not event_type:
        return "bad_envelope"
    time_text = message.header_text("cloudEvents:time")
    if time_text:
        try:
            datetime.fromisoformat(time_text)
        except ValueError:
            return "bad_envelope"
    if event_type not in HANDLED[service]:
        return "unknown_event_type"
    version = message.header_text("cloudEvents:schemaversion") or "1.0"
    try:
        major = int(version.split(".", 1)[0])
    except ValueError:
        major = -1
    if major != 1:
        return "unsupported_version"
    media = (message.content_type or "application/json").split(";")[0].strip().lower()
    if media != "application/json":
        return "unsupported_content_type"
    try:
        data = json.loads(message.body)
    except Exception:  # the spec: a body that does not parse as JSON, for whatever reason
        return "invalid_json"
    try:
        model_for(event_type).model_validate(data)
    except ValidationError:
        return "schema_violation"
    return None


def bad_everywhere(message: Hostile) -> bool:
    return all(expected_reason(message, s) is not None for s in ROUTES[message.routing_key])


# -- building blocks -----------------------------------------------------------------------
def headers_for(event_type: str, event_id: str, **overrides: Any) -> dict[str, Any]:
    headers: dict[str, Any] = {
        "cloudEvents:specversion": "1.0",
        "cloudEvents:id": event_id,
        "cloudEvents:type": event_type,
        "cloudEvents:source": "hostile",
        "cloudEvents:time": "2026-01-15T09:30:00+00:00",
        "cloudEvents:schemaversion": "1.0",
        "cloudEvents:correlationid": event_id,
    }
    for key, value in overrides.items():
        name = f"cloudEvents:{key}"
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    return headers


def message(
    kind: str,
    event_type: str,
    body: bytes,
    *,
    n: int,
    routing_key: str | None = None,
    message_id: str | None = "",
    type_property: str | None = "",
    content_type: str | None = "application/json",
    **header_overrides: Any,
) -> Hostile:
    event_id = f"hostile-{kind}-{n}" if message_id == "" else message_id
    return Hostile(
        kind=kind,
        routing_key=routing_key or event_type,
        body=body,
        message_id=event_id,
        type=event_type if type_property == "" else type_property,
        headers=headers_for(event_type, event_id or "", **header_overrides),
        content_type=content_type,
    )


def dumps(data: Any) -> bytes:
    return json.dumps(data).encode()


event_types = st.sampled_from(sorted(TEMPLATES))
identity_types = st.sampled_from(sorted(LIMITED))
numbers = st.integers(min_value=0, max_value=10**6)
text = st.text(alphabet=string.ascii_letters + string.digits + " -_.:/@+", max_size=40)
wrong_values = st.one_of(
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.none(),
)


# -- the kinds of defect ---------------------------------------------------------------------
@st.composite
def invalid_json(draw: st.DrawFn) -> Hostile:
    event_type = draw(event_types)
    good = dumps(TEMPLATES[event_type])
    variant = draw(st.sampled_from(["bytes", "truncated", "trailing", "not_utf8", "empty"]))
    if variant == "bytes":
        body = draw(st.binary(min_size=1, max_size=300))
    elif variant == "truncated":
        body = good[: draw(st.integers(min_value=0, max_value=len(good) - 1))]
    elif variant == "trailing":
        body = good + draw(st.binary(min_size=1, max_size=20)).replace(b" ", b"x") + b"}"
    elif variant == "not_utf8":
        body = b'{"user_id": "' + draw(st.binary(min_size=1, max_size=20)) + b'\xff\xfe"}'
    else:
        body = b""
    return message("invalid_json", event_type, body, n=draw(numbers))


@st.composite
def deep_nesting(draw: st.DrawFn) -> Hostile:
    event_type = draw(event_types)
    field_name = next(iter(TEMPLATES[event_type]))
    # far past the parser's recursion limit, or well inside it (then it is the wrong type)
    depth = draw(st.one_of(st.integers(2_000, 60_000), st.integers(1, 300)))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    nested = opener * depth + "0" + closer * depth
    body = f'{{"{field_name}": {nested}}}'.encode()
    return message("deep_nesting", event_type, body, n=draw(numbers))


@st.composite
def huge_number(draw: st.DrawFn) -> Hostile:
    event_type = draw(event_types)
    field_name = draw(st.sampled_from(sorted(TEMPLATES[event_type])))
    digits = draw(st.integers(4_301, 200_000))  # past Python's int-parsing digit limit
    data = dict(TEMPLATES[event_type])
    body = dumps(data).replace(
        json.dumps(field_name).encode() + b": " + dumps(data[field_name]),
        json.dumps(field_name).encode() + b": " + b"7" * digits,
    )
    return message("huge_number", event_type, body, n=draw(numbers))


@st.composite
def wrong_types(draw: st.DrawFn) -> Hostile:
    event_type = draw(event_types)
    data = dict(TEMPLATES[event_type])
    field_name = draw(st.sampled_from(sorted(data)))
    data[field_name] = draw(wrong_values)
    return message("wrong_types", event_type, dumps(data), n=draw(numbers))


@st.composite
def missing_field(draw: st.DrawFn) -> Hostile:
    event_type = draw(event_types)
    data = dict(TEMPLATES[event_type])
    for name in draw(st.lists(st.sampled_from(sorted(data)), min_size=1, unique=True)):
        data.pop(name)
    whole = draw(st.sampled_from(["object", "null", "array", "string", "number"]))
    body = {"object": data, "null": None, "array": [data], "string": "x", "number": 1}[whole]
    return message("missing_field", event_type, dumps(body), n=draw(numbers))


@st.composite
def huge_strings(draw: st.DrawFn) -> Hostile:
    event_type = draw(identity_types)
    limits = LIMITED[event_type]
    field_name = draw(st.sampled_from(sorted(limits)))
    length = draw(st.integers(limits[field_name] + 1, 200_000))
    chunk = draw(st.text(alphabet=string.ascii_lowercase + "é漢😀", min_size=1, max_size=8))
    value = (chunk * (length // len(chunk) + 1))[:length]
    if field_name == "email":
        value = value[: length - 12] + "@example.com"
    data = {**TEMPLATES[event_type], field_name: value}
    return message("huge_strings", event_type, dumps(data), n=draw(numbers))


@st.composite
def oversize(draw: st.DrawFn) -> Hostile:
    event_type = draw(event_types)
    size = draw(st.integers(MAX_MESSAGE_BYTES + 1, MAX_MESSAGE_BYTES + 60_000))
    data = {**TEMPLATES[event_type], "padding": ""}
    base = len(dumps(data))
    data["padding"] = "p" * max(0, size - base)
    return message("oversize", event_type, dumps(data), n=draw(numbers))


@st.composite
def unknown_type(draw: st.DrawFn) -> Hostile:
    routing_key = draw(st.sampled_from(sorted(ROUTES)))
    handled = set().union(*(HANDLED[s] for s in ROUTES[routing_key]))
    candidates = st.one_of(
        text.filter(lambda t: t.strip() != "" and t not in handled),
        st.sampled_from(
            [
                "user.deleted",
                "billing.credits_granted",
                "organization.deleted",
                "user.signed_up.v2",
                "USER.SIGNED_UP",
            ]
        ),
        st.sampled_from(sorted(set(TEMPLATES) - handled)),  # a known type, not for this queue
    )
    event_type = draw(candidates)
    in_header = draw(st.booleans())
    body = dumps(TEMPLATES.get(event_type, TEMPLATES[routing_key]))
    return message(
        "unknown_type",
        routing_key,
        body,
        n=draw(numbers),
        type_property=None if in_header else event_type,
        type=event_type if in_header else None,
    )


@st.composite
def unknown_version(draw: st.DrawFn) -> Hostile:
    event_type = draw(event_types)
    version = draw(
        st.one_of(
            st.builds(lambda a, b: f"{a}.{b}", st.integers(2, 999), st.integers(0, 99)),
            st.builds(lambda b: f"0.{b}", st.integers(0, 99)),
            st.sampled_from(["v1", "one", "1x", "-1.0", "1e0", "2", "[1]", "∞.0"]),
            st.integers(2, 10**6),  # a number, not text
        )
    )
    return message(
        "unknown_version",
        event_type,
        dumps(TEMPLATES[event_type]),
        n=draw(numbers),
        schemaversion=version,
    )


@st.composite
def missing_id(draw: st.DrawFn) -> Hostile:
    event_type = draw(event_types)
    blank = draw(st.sampled_from([None, ""]))
    return message(
        "missing_id",
        event_type,
        dumps(TEMPLATES[event_type]),
        n=draw(numbers),
        message_id=None,
        id=blank,
    )


@st.composite
def missing_type(draw: st.DrawFn) -> Hostile:
    event_type = draw(event_types)
    return message(
        "missing_type",
        event_type,
        dumps(TEMPLATES[event_type]),
        n=draw(numbers),
        type_property=None,
        type=draw(st.sampled_from([None, ""])),
    )


@st.composite
def bad_time(draw: st.DrawFn) -> Hostile:
    event_type = draw(event_types)
    value = draw(
        st.one_of(
            text.filter(lambda t: t.strip() != ""),
            st.sampled_from(["yesterday", "2026-13-45T99:99:99Z", "15/01/2026", "NaN", "1e9"]),
            st.integers(min_value=1),
        )
    )
    return message(
        "bad_time", event_type, dumps(TEMPLATES[event_type]), n=draw(numbers), time=value
    )


@st.composite
def duplicated_id(draw: st.DrawFn) -> Hostile:
    """A bad message reusing an id: of other bad messages, or of a good message."""
    event_type = draw(event_types)
    shared_id = draw(
        st.one_of(st.sampled_from(GOOD_DUPLICATE_IDS), st.sampled_from(["dup-bad-0", "dup-bad-1"]))
    )
    data = {**TEMPLATES[event_type], next(iter(TEMPLATES[event_type])): draw(wrong_values)}
    return message("duplicated_id", event_type, dumps(data), n=0, message_id=shared_id)


@st.composite
def wrong_content_type(draw: st.DrawFn) -> Hostile:
    # payloads whose effect is harmless if applied: a verification of a user nobody signed
    # up, a membership billing only records
    event_type = draw(st.sampled_from(["user.email_verified", "organization.provisioned"]))
    n = draw(numbers)
    data = {**TEMPLATES[event_type], "user_id": f"content-type-{n}"}
    media = draw(st.sampled_from(WRONG_CONTENT_TYPES))
    charset = draw(st.sampled_from(["", "; charset=utf-8"]))
    return message("wrong_content_type", event_type, dumps(data), n=n, content_type=media + charset)


@st.composite
def forged_failure_headers(draw: st.DrawFn) -> Hostile:
    """A bad message claiming to come from elsewhere (failure headers are the consumer's)."""
    event_type = draw(event_types)
    data = {**TEMPLATES[event_type]}
    data.pop(next(iter(data)))
    hostile = message("forged_failure_headers", event_type, dumps(data), n=draw(numbers))
    hostile.headers.update(
        {
            "x-grantwire-original-exchange": draw(text),
            "x-grantwire-original-routing-key": draw(
                st.sampled_from(["billing.grants", "#", "user.deleted"])
            ),
            "x-grantwire-reason": "ok",
            "x-grantwire-attempts": draw(st.integers(-5, 10**6)),
        }
    )
    return hostile


KINDS: dict[str, tuple[Callable[[], st.SearchStrategy[Hostile]], int]] = {
    "invalid_json": (invalid_json, 100),
    "deep_nesting": (deep_nesting, 80),
    "huge_number": (huge_number, 40),
    "wrong_types": (wrong_types, 120),
    "missing_field": (missing_field, 60),
    "huge_strings": (huge_strings, 80),
    "oversize": (oversize, 40),
    "unknown_type": (unknown_type, 80),
    "unknown_version": (unknown_version, 80),
    "missing_id": (missing_id, 60),
    "missing_type": (missing_type, 60),
    "bad_time": (bad_time, 80),
    "duplicated_id": (duplicated_id, 80),
    "wrong_content_type": (wrong_content_type, 60),
    "forged_failure_headers": (forged_failure_headers, 40),
}


def generate() -> list[Hostile]:
    """Every kind's messages, deterministically; each is bad for every service it reaches."""
    found: list[Hostile] = []
    for build, count in KINDS.values():

        @settings(
            max_examples=count,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(build().filter(bad_everywhere))
        def collect(case: Hostile) -> None:
            found.append(case)

        collect()
    return [unique_id(number, case) for number, case in enumerate(found)]


def unique_id(number: int, case: Hostile) -> Hostile:
    """``case`` with an id of its own (hypothesis repeats the numbers it draws): only the
    ``duplicated_id`` kind shares ids on purpose, and ``missing_id`` has none."""
    if case.kind == "duplicated_id" or case.message_id is None:
        return case
    new = f"hostile-{case.kind}-{number}"
    headers = {
        k: (
            new
            if k in ("cloudEvents:id", "cloudEvents:correlationid") and v == case.message_id
            else v
        )
        for k, v in case.headers.items()
    }
    return replace(case, message_id=new, headers=headers)


# -- HTTP ---------------------------------------------------------------------------------
AUTH_KINDS = (
    "none",
    "garbage",
    "basic",
    "wrong_secret",
    "alg_none",
    "alg_rs256_header",
    "expired",
    "sub_not_text",
    "no_email",
    "roles_not_list",
    "exp_not_number",
    "huge",
    "valid",
    "valid_admin",
)


@dataclass(frozen=True)
class HttpCase:
    """One request; ``auth`` names the kind of bearer token, made with the run's secret."""

    kind: str
    service: str
    method: str
    path: str  # segments already percent-encoded
    auth: str = "valid"
    params: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    content_type: str | None = None


def bearer(auth: str, secret: str) -> dict[str, str]:
    """The ``Authorization`` header of an auth kind (none for ``none``)."""
    import time as clock

    import jwt

    now = int(clock.time())
    claims: dict[str, Any] = {
        "sub": "hostile-caller",
        "email": "caller@example.com",
        "roles": [],
        "exp": now + 600,
    }
    if auth == "none":
        return {}
    if auth == "garbage":
        return {"Authorization": "Bearer not.a.token"}
    if auth == "basic":
        return {"Authorization": "Basic aG9zdGlsZTpob3N0aWxl"}
    if auth == "huge":
        return {"Authorization": "Bearer " + "a" * 12_000}
    key, algorithm = secret, "HS256"
    if auth == "wrong_secret":
        key = "not-the-secret-" + "x" * 32
    elif auth == "alg_none":
        key, algorithm = "", "none"
    elif auth == "alg_rs256_header":  # algorithm confusion: RS256 claimed, HMAC signed
        import base64
        import hashlib
        import hmac

        def b64(raw: bytes) -> str:
            return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

        signing = f"{b64(dumps({'alg': 'RS256', 'typ': 'JWT'}))}.{b64(dumps(claims))}"
        mac = hmac.new(secret.encode(), signing.encode(), hashlib.sha256).digest()
        return {"Authorization": f"Bearer {signing}.{b64(mac)}"}
    elif auth == "expired":
        claims["exp"] = now - 3600
    elif auth == "sub_not_text":
        claims["sub"] = 12345
    elif auth == "no_email":
        claims.pop("email")
    elif auth == "roles_not_list":
        claims["roles"] = "admin"
    elif auth == "exp_not_number":
        claims["exp"] = "tomorrow"
    elif auth == "valid_admin":
        claims["roles"] = ["admin"]
    token = jwt.encode(claims, key or None, algorithm=algorithm)
    return {"Authorization": f"Bearer {token}"}


segment_text = st.one_of(
    st.text(max_size=60),
    st.sampled_from(["..", "%00", "\x00", "null", "0" * 24, "f" * 24, "'; drop", "${jndi:x}"]),
    st.builds(lambda n: "z" * n, st.integers(200, 4_000)),
)
query_value = st.one_of(
    st.text(max_size=40),
    st.integers(-(10**30), 10**30).map(str),
    st.sampled_from(
        [
            "",
            "NaN",
            "1e309",
            "-0",
            "9999999999999999.0123456789abcdef01234567",
            "-9999999999999999.0123456789abcdef01234567",
            "1.zzzz",
        ]
    ),
)


def quote(segment: str) -> str:
    from urllib.parse import quote as url_quote

    return url_quote(segment, safe="")


@st.composite
def http_body(draw: st.DrawFn) -> tuple[str, bytes, str | None]:
    """(kind, body, content type) of a bad request body for ``POST /invitations``."""
    kind = draw(
        st.sampled_from(
            [
                "bad_json",
                "wrong_types",
                "oversized",
                "deep_json",
                "content_type",
                "not_utf8",
                "huge_email",
            ]
        )
    )
    content_type: str | None = "application/json"
    if kind == "bad_json":
        body = draw(st.binary(max_size=200).filter(lambda b: not _parses(b)))
    elif kind == "wrong_types":
        value = draw(st.one_of(wrong_values, st.text(max_size=20)))
        shape = draw(st.sampled_from(["email", "send_email", "whole"]))
        data: Any = (
            {"email": value}
            if shape == "email"
            else (
                {"email": "friend@example.com", "send_email": value}
                if shape == "send_email"
                else value
            )
        )
        body = dumps(data)
    elif kind == "oversized":
        body = dumps({"email": "e" * draw(st.integers(70_000, 3_000_000)) + "@example.com"})
    elif kind == "deep_json":
        depth = draw(st.integers(1_000, 30_000))
        body = b'{"email": ' + b"[" * depth + b"]" * depth + b"}"
    elif kind == "content_type":
        body = dumps({"email": f"ct{draw(numbers)}@example.com"})
        content_type = draw(
            st.sampled_from([None, *WRONG_CONTENT_TYPES, "application/json; charset=latin-1"])
        )
    elif kind == "not_utf8":
        body = b'{"email": "' + draw(st.binary(min_size=1, max_size=20)) + b'\xff\xfe"}'
    else:
        body = dumps({"email": draw(st.text(min_size=321, max_size=5_000)) + "@example.com"})
    return kind, body, content_type


def _parses(body: bytes) -> bool:
    try:
        json.loads(body)
    except Exception:
        return False
    return True


ROUTE_WEIGHTS = (
    *["create"] * 5,
    "list",
    "revoke",
    "resend",
    "verify",
    "organization",
    "balance",
    *["ledger"] * 2,
    "unknown",
)


@st.composite
def http_case(draw: st.DrawFn) -> HttpCase:
    route = draw(st.sampled_from(ROUTE_WEIGHTS))
    # mostly a valid token where the request must get past authentication to be checked
    usual = "valid_admin" if route in ("balance", "ledger", "list") else "valid"
    auth = draw(st.sampled_from([usual, usual, *AUTH_KINDS]))
    segment = quote(draw(segment_text)) or "x"
    if route == "create":
        body_kind, body, content_type = draw(http_body())
        return HttpCase(
            f"body:{body_kind}",
            "invitations",
            "POST",
            "/invitations",
            auth,
            body=body,
            content_type=content_type,
        )
    if route == "list":
        params = draw(
            st.lists(st.tuples(st.sampled_from(["limit", "before", "x"]), query_value), max_size=3)
        )
        return HttpCase("query", "invitations", "GET", "/invitations", auth, tuple(params))
    if route in ("revoke", "resend"):
        method, suffix = ("DELETE", "") if route == "revoke" else ("POST", "/resend")
        return HttpCase("path", "invitations", method, f"/invitations/{segment}{suffix}", auth)
    if route == "verify":
        return HttpCase("path", "invitations", "GET", f"/invitations/verify/{segment}", "none")
    if route == "organization":
        return HttpCase("path", "organizations", "GET", f"/users/{segment}/organization", auth)
    if route in ("balance", "ledger"):
        params = ()
        if route == "ledger":
            params = tuple(
                draw(
                    st.lists(
                        st.tuples(st.sampled_from(["limit", "cursor"]), query_value), max_size=2
                    )
                )
            )
        return HttpCase(
            "query" if params else "path",
            "billing",
            "GET",
            f"/organizations/{segment}/{route}",
            auth,
            params,
        )
    service = draw(st.sampled_from(["organizations", "invitations", "billing"]))
    method = draw(st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE"]))
    return HttpCase("unknown_route", service, method, f"/{segment}", auth, body=b"{}")


def generate_http(count: int = 600) -> list[HttpCase]:
    found: list[HttpCase] = []

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(http_case())
    def collect(case: HttpCase) -> None:
        found.append(case)

    collect()
    return found
