"""Reads who may call a service: `mesh_authz_default`, a policy's `mtls` and `authz` (mesh_services), and a
run-time deny (Consul KV); writes their canonical JSON and their inventory syntax; finds the declared calls that
a service's rules deny entirely.

It owns the authorization syntax (mesh/inventory/services.py calls it for a policy's two fields); the meaning of
the rules as Envoy entries is mesh/config/authz.py's. It must not read files or Consul.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, cast

from mesh.errors import MeshError, Origin
from mesh.inventory.located import Located, Problems
from mesh.inventory.model import health_checker_spiffe_id, spiffe_id
from mesh.inventory.policy import (
    AUTHZ_DEFAULTS,
    MTLS_MODES,
    RULE_MODES,
    UNAUTHENTICATED,
    AuthzDefault,
    AuthzOverride,
    AuthzRule,
    AuthzRules,
    MtlsMode,
    PathMatch,
    ServicePolicy,
)
from mesh.inventory.policy_reading import MISSING, Missing, mapping, read_pairs, read_value, suggest
from mesh.inventory.policy_values import check_header_name, check_header_value, check_method, check_path
from mesh.inventory.values import BadValue, check_dns_label, describe
from mesh.pki.spiffe import spiffe_path

AUTHZ_DEFAULT_KEY = "mesh_authz_default"
AUTHZ_KEYS = ("allow", "deny")
RULE_KEYS = ("from", "methods", "paths", "headers", "mode")
HTTP_RULE_KEYS = ("methods", "paths", "headers")
DENY_OVERRIDE_KEYS = ("deny_from", "revision", "set_by", "at")
MAX_RULES = 256  # per list: each is an RBAC policy in every instance's Envoy
MAX_ITEMS = 256  # sources, methods, paths or headers of one rule
SPIFFE = "spiffe://"
JSON_ORIGIN = Origin("<json>")
SOURCE_EXPECTED = ("a service name, a SPIFFE id such as spiffe://<trust domain>/svc/<service>, or "
                   "unauthenticated")


@dataclass(frozen=True)
class SourceScope:
    """What a rule is checked against: the service it protects, and the trust domain and services a source may
    name (None: not known, as for JSON read without the inventory; only the syntax is checked)."""

    service: str = "the service"
    tcp: bool = False
    trust_domain: str | None = None
    services: tuple[str, ...] | None = None


# --- reading ----------------------------------------------------------------------------------------------------

def read_authz_default(where: Located | None, problems: Problems) -> AuthzDefault:
    """`mesh_authz_default` (declared when unset or invalid, recorded)."""
    if where is None:
        return "declared"
    if where.value not in AUTHZ_DEFAULTS:
        problems.at(where, f"expected declared (only workloads that list the service in their upstreams), allow "
                           f"(any identity of the trust domain) or deny (only explicit allow rules), got "
                           f"{describe(where.value)}", suggest(where.value, AUTHZ_DEFAULTS))
        return "declared"
    return cast(AuthzDefault, where.value)


def read_mtls(where: Located, problems: Problems) -> MtlsMode | Missing:
    if where.value not in MTLS_MODES:
        problems.at(where, f"expected strict (only mTLS clients) or permissive (plaintext clients too, as "
                           f"`unauthenticated`), got {describe(where.value)}",
                    suggest(where.value, MTLS_MODES) or _quote_hint(where.value))
        return MISSING
    return cast(MtlsMode, where.value)


def read_authz(where: Located, scope: SourceScope, problems: Problems) -> AuthzRules | Missing:
    """A policy's `authz`: {allow: [rules], deny: [rules]}, either may be left out."""
    if not mapping(where, AUTHZ_KEYS, "authz", problems, "{allow: [{from: [web]}], deny: [...]}"):
        return MISSING
    reader = _RuleReader(scope, problems)
    lists = {kind: reader.rules(where.child(kind)) if where.value.get(kind) is not None else ()
             for kind in AUTHZ_KEYS}
    if any(isinstance(rules, Missing) for rules in lists.values()):
        return MISSING
    return AuthzRules(allow=cast(Any, lists["allow"]), deny=cast(Any, lists["deny"]))


class _RuleReader:
    def __init__(self, scope: SourceScope, problems: Problems) -> None:
        self.scope = scope
        self.problems = problems

    def rules(self, where: Located) -> tuple[AuthzRule, ...] | Missing:
        if not isinstance(where.value, list):
            self.problems.at(where, f"expected a list of rules such as [{{from: [web], methods: [GET]}}], got "
                                    f"{describe(where.value)}")
            return MISSING
        if len(where.value) > MAX_RULES:
            self.problems.at(where, f"expected at most {MAX_RULES} rules, got {len(where.value)}")
            return MISSING
        rules = [self.rule(where.child(index)) for index in range(len(where.value))]
        if any(isinstance(rule, Missing) for rule in rules):
            return MISSING
        return tuple(cast(list[AuthzRule], rules))

    def rule(self, where: Located) -> AuthzRule | Missing:
        if not mapping(where, RULE_KEYS, "authz rule", self.problems,
                       "{from: [web], methods: [GET], paths: [/orders, /orders/*]}"):
            return MISSING
        values = where.value
        refused = [key for key in HTTP_RULE_KEYS if key in values] if self.scope.tcp else []
        for key in refused:
            self.problems.add_error(where, key, f"{self.scope.service} is a TCP service (protocol tcp): a connection "
                                                "has no methods, paths or headers; a rule on it names sources only")
        sources = self.items(where, "from", self.source) if "from" in values else ()
        methods = self.items(where, "methods", lambda spot: read_value(spot, check_method, self.problems)) \
            if "methods" in values else ()
        paths = self.items(where, "paths", lambda spot: read_value(spot, parse_rule_path, self.problems)) \
            if "paths" in values else ()
        headers = read_pairs(where.child("headers"), check_header_name, check_header_value, "headers",
                             self.problems) if "headers" in values else ()
        if isinstance(headers, tuple) and len(headers) > MAX_ITEMS:
            self.problems.at(where.child("headers"), f"expected at most {MAX_ITEMS} headers, got {len(headers)}")
            headers = MISSING
        mode = self.mode(where.child("mode")) if "mode" in values else "enforce"
        parts = (sources, methods, paths, headers, mode)
        if refused or any(isinstance(part, Missing) for part in parts):
            return MISSING
        return AuthzRule(*cast(Any, parts))

    def items(self, where: Located, key: str, read: Callable[[Located], Any]) -> tuple[Any, ...] | Missing:
        """A non-empty list under key, each item read by read(spot); an item written twice is an error."""
        spot = where.child(key)
        if not isinstance(spot.value, list) or not spot.value:
            example = {"from": "[web, spiffe://mesh.local/svc/batch]", "methods": "[GET, POST]",
                       "paths": "[/orders, /orders/*]"}[key]
            omit = "any source" if key == "from" else f"any {key[:-1]}"
            self.problems.at(spot, f"expected a non-empty list such as {example} (leave `{key}` out for {omit}), "
                                   f"got {describe(spot.value)}")
            return MISSING
        if len(spot.value) > MAX_ITEMS:
            self.problems.at(spot, f"expected at most {MAX_ITEMS} items, got {len(spot.value)}")
            return MISSING
        found: list[Any] = []
        seen: dict[Any, Any] = {}
        ok = True
        for index in range(len(spot.value)):
            item = read(spot.child(index))
            if isinstance(item, Missing):
                ok = False
                continue
            same = self._identity(item)
            if same in seen:
                self.problems.at(spot.child(index), f"{_show(item)} is written twice"
                                 + (f" (as {_show(seen[same])})" if seen[same] != item else ""))
                ok = False
                continue
            seen[same] = item
            found.append(item)
        return tuple(found) if ok else MISSING

    def _identity(self, item: Any) -> Any:
        """What makes two items the same: a service and its SPIFFE id (in the known trust domain) are one."""
        if self.scope.trust_domain is not None and isinstance(item, str):
            return item.removeprefix(f"{SPIFFE}{self.scope.trust_domain}/svc/")
        return item

    def source(self, where: Located) -> str | Missing:
        try:
            return parse_source(where.value, self.scope.trust_domain, self.scope.services)
        except UnknownSource as exc:
            self.problems.at(where, str(exc), exc.hint)
        except BadValue as exc:
            self.problems.at(where, str(exc))
        return MISSING

    def mode(self, where: Located) -> str | Missing:
        if where.value not in RULE_MODES:
            self.problems.at(where, f"expected enforce or shadow (only log what the rule would deny), got "
                                    f"{describe(where.value)}",
                             suggest(where.value, RULE_MODES) or _quote_hint(where.value))
            return MISSING
        return cast(str, where.value)


def _quote_hint(value: Any) -> str | None:
    return "YAML reads yes, no, on, off, true and false as booleans" if isinstance(value, bool) else None


class UnknownSource(BadValue):
    """A source that names a service no host runs; hint: a did-you-mean."""

    def __init__(self, message: str, hint: str | None) -> None:
        super().__init__(message)
        self.hint = hint


def parse_source(value: Any, trust_domain: str | None = None, services: Collection[str] | None = None) -> str:
    """A rule's (or a run-time deny's) source as written: `unauthenticated`, a service name, or the SPIFFE id of a
    service (`spiffe://<trust domain>/svc/<service>`). With trust_domain, an id must be in it; with services,
    the service must be one of them (UnknownSource otherwise). The checker's id is never a source."""
    if value == UNAUTHENTICATED:
        return UNAUTHENTICATED
    if not isinstance(value, str) or not value or len(value) > 512:
        raise BadValue(f"expected {SOURCE_EXPECTED}, got {describe(value)}")
    service = value
    if value.startswith(SPIFFE):
        domain = value[len(SPIFFE):].partition("/")[0]
        try:
            segments = spiffe_path(value, domain)
        except MeshError as exc:
            raise BadValue(f"expected {SOURCE_EXPECTED}: {exc}") from None
        if trust_domain is not None and domain != trust_domain:
            raise BadValue(f"{value!r} is outside the mesh's trust domain {trust_domain!r}: no certificate of this "
                           f"mesh carries it")
        if value == health_checker_spiffe_id(domain):
            raise BadValue(f"{value!r} is mesh's health checker: it reaches only the health chain and cannot be "
                           "named in a rule")
        service = segments[-1]
        if len(segments) != 2 or segments[0] != "svc" or not _is_service_name(service):
            raise BadValue(f"expected a service's SPIFFE id, spiffe://{domain}/svc/<service>, got {value!r} (mesh "
                           "issues no other ids)")
    elif not _is_service_name(value):
        raise BadValue(f"expected {SOURCE_EXPECTED}, got {describe(value)}")
    if services is not None and service not in services:
        raise UnknownSource(f"no host runs the service {service!r}; known services: "
                            f"{', '.join(sorted(services)) or 'none'}", suggest(service, sorted(services)))
    return value


def _is_service_name(value: str) -> bool:
    try:
        check_dns_label(value)
    except BadValue:
        return False
    return True


def parse_rule_path(value: Any) -> PathMatch:
    """A rule's path: `/x` matches exactly /x, `/x/*` every path under /x/ (a prefix); the query string is never
    matched, so a path holds no '?' or '#', and '*' only as the last segment."""
    if value == "*":
        raise BadValue("`*` alone is not a path: leave `paths` out to match every path")
    text = check_path(value)
    prefix = text.endswith("/*")
    body = text[:-1] if prefix else text
    if "*" in body:
        raise BadValue(f"expected /x (exactly /x) or /x/* (every path under /x/), got {value!r}: '*' may only be "
                       "the last segment")
    if "?" in body or "#" in body:
        raise BadValue(f"expected a path without a query or fragment, got {value!r}: a rule matches the path "
                       "only (the query is never matched)")
    return PathMatch("prefix" if prefix else "exact", body)


# --- writing ----------------------------------------------------------------------------------------------------

def path_text(path: PathMatch) -> str:
    """A rule's path as the inventory writes it: `/x` or `/x/*`."""
    return f"{path.value}*" if path.kind == "prefix" else path.value


def rule_to_json(rule: AuthzRule) -> dict[str, Any]:
    """A rule in the inventory's syntax, only the fields it sets."""
    out: dict[str, Any] = {}
    if rule.sources:
        out["from"] = list(rule.sources)
    if rule.methods:
        out["methods"] = list(rule.methods)
    if rule.paths:
        out["paths"] = [path_text(path) for path in rule.paths]
    if rule.headers:
        out["headers"] = dict(rule.headers)
    if rule.mode != "enforce":
        out["mode"] = rule.mode
    return out


def authz_to_json(rules: AuthzRules) -> dict[str, Any]:
    return {kind: [rule_to_json(rule) for rule in getattr(rules, kind)] for kind in AUTHZ_KEYS
            if getattr(rules, kind)}


def rule_text(rule: AuthzRule) -> str:
    """A rule in one line of the inventory's (flow YAML) syntax: `{from: [web], paths: [/admin/*]}`."""
    parts = []
    for key, value in rule_to_json(rule).items():
        if isinstance(value, list):
            parts.append(f"{key}: [{', '.join(_flow(item) for item in value)}]")
        elif isinstance(value, dict):
            parts.append(f"{key}: {{{', '.join(f'{name}: {_flow(text)}' for name, text in value.items())}}}")
        else:
            parts.append(f"{key}: {value}")
    return "{" + ", ".join(parts) + "}"


def _flow(text: str) -> str:
    """text as a flow YAML scalar: plain when safe, else JSON-quoted (valid YAML)."""
    plain = re.fullmatch(r"[A-Za-z0-9/_.\-*][A-Za-z0-9/_.\-*:~%+=@]*", text) and not text.endswith(":")
    return text if plain and text.lower() not in ("yes", "no", "true", "false", "on", "off", "null", "~") \
        else json.dumps(text)


def _show(item: Any) -> str:
    return repr(path_text(item)) if isinstance(item, PathMatch) else repr(item)


# --- run-time deny ----------------------------------------------------------------------------------------------

def deny_override_to_json(override: AuthzOverride, set_by: str = "", at: str = "") -> dict[str, Any]:
    return {"deny_from": list(override.deny_from), "revision": override.revision, "set_by": set_by, "at": at}


def read_deny_override(data: Any, problems: Problems, trust_domain: str | None = None,
                       services: Collection[str] | None = None) -> AuthzOverride | None:
    """The run-time deny of a KV value ({"deny_from": [...], "revision": ..., "set_by": ..., "at": ...}); its
    sources sorted and unique. None after recording its problems."""
    where = Located(data, JSON_ORIGIN, "authz override")
    if not mapping(where, DENY_OVERRIDE_KEYS, "authz override", problems, '{"deny_from": ["web"]}'):
        return None
    count = len(problems.errors)
    sources: list[str] = []
    spot = Located(data.get("deny_from"), where.origin, "deny_from")
    if not isinstance(spot.value, list) or len(spot.value) > MAX_ITEMS:
        problems.at(spot, f"expected a list of at most {MAX_ITEMS} sources ({SOURCE_EXPECTED}), got "
                          f"{describe(spot.value)}")
    else:
        for index in range(len(spot.value)):
            try:
                sources.append(parse_source(spot.value[index], trust_domain, services))
            except UnknownSource as exc:
                problems.at(spot.child(index), str(exc), exc.hint)
            except BadValue as exc:
                problems.at(spot.child(index), str(exc))
    for key in ("revision", "set_by", "at"):
        if not isinstance(data.get(key, ""), str):
            problems.at(Located(data[key], where.origin, key), f"expected a string, got {describe(data[key])}")
    if len(problems.errors) != count:
        return None
    return AuthzOverride(deny_from=tuple(sorted(set(sources))), revision=data.get("revision", ""))


# --- declared calls denied entirely -----------------------------------------------------------------------------

def names_source(rule: AuthzRule, names: Iterable[str]) -> bool:
    """True when rule's `from` lists one of names (a service name or id), or is left out (any source)."""
    return not rule.sources or bool(set(rule.sources) & set(names))


@dataclass(frozen=True)
class TotalDenial:
    """Why a service's authorization denies a caller every request."""

    deny_index: int | None  # the enforced deny rule's index in `authz.deny`; None: the default `deny`
    reason: str  # in words, naming the rule in the inventory's syntax


def total_denial(caller: str, trust_domain: str, policy: ServicePolicy,
                 authz_default: AuthzDefault) -> TotalDenial | None:
    """Why every request of `caller` (a service that declares this one as an upstream) is denied, or None when
    some request may pass: an enforced deny rule naming it (or any source) with no method, path or header, or
    the default `deny` with no enforced allow rule for it (by name, id, or for any source)."""
    names = (caller, spiffe_id(trust_domain, caller))
    for index, rule in enumerate(policy.authz.deny):
        if rule.mode == "enforce" and rule.unconditional and names_source(rule, names):
            return TotalDenial(index, f"authz.deny[{index}] {rule_text(rule)}")
    allowed = any(rule.mode == "enforce" and names_source(rule, names) for rule in policy.authz.allow)
    if authz_default == "deny" and not allowed:
        return TotalDenial(None, f"{AUTHZ_DEFAULT_KEY} is deny and no enforced allow rule names {caller}")
    return None
