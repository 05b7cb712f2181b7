"""What a service's authorization compiles to (the RBAC entries Envoy's DENY and ALLOW filters get, named as
Envoy reports them) and what those entries decide for a request: the mesh's three defaults, allow rules that
narrow a declared caller, deny over allow, shadow rules, the run-time deny, plaintext clients of a permissive
service, the checker, and how paths, queries, methods and headers match."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.config.authz import (
    AuthzConfig,
    AuthzDecision,
    AuthzEntry,
    AuthzRequest,
    InboundInputs,
    Principal,
    compile_authz,
    decide,
    source_id,
)
from mesh.inventory.authz import parse_rule_path
from mesh.inventory.policy import AuthzDefault, AuthzOverride, AuthzRule, AuthzRules, ServicePolicy

TD = "lab.mesh"
WEB, API, DB, BATCH = (f"spiffe://{TD}/svc/{name}" for name in ("web", "api", "db", "batch"))
CHECKER = f"spiffe://{TD}/mesh/health"
PLAINTEXT = None


def inputs(default: AuthzDefault = "declared", callers: tuple[str, ...] = ("web",),
           protocol: str = "http") -> InboundInputs:
    return InboundInputs("api", "v1", protocol, TD, default, callers)  # type: ignore[arg-type]


def rule(*sources: str, methods: tuple[str, ...] = (), paths: tuple[str, ...] = (),
         headers: tuple[tuple[str, str], ...] = (), mode: str = "enforce") -> AuthzRule:
    return AuthzRule(sources, methods, tuple(parse_rule_path(path) for path in paths), headers, mode)  # type: ignore[arg-type]


def policy(allow: tuple[AuthzRule, ...] = (), deny: tuple[AuthzRule, ...] = (), mtls: str = "strict") -> ServicePolicy:
    return ServicePolicy(mtls=mtls, authz=AuthzRules(allow, deny))  # type: ignore[arg-type]


def ask(config: AuthzConfig, source: str | None, method: str | None = "GET", path: str | None = "/",
        headers: tuple[tuple[str, str], ...] = ()) -> tuple[bool, str, tuple[str, ...]]:
    decision = decide(config, AuthzRequest(source, method, path, headers))
    return decision.allowed, decision.rule, decision.would_deny


ALLOWED_BY_DEFAULT = (True, "default", ())
NO_MATCH = (False, "none", ())


# --- the mesh's default -------------------------------------------------------------------------------------------

def test_declared_accepts_only_the_callers_that_declare_the_service() -> None:
    config = compile_authz(inputs("declared", ("web", "batch")), ServicePolicy(), None)
    assert config == AuthzConfig(deny=(), deny_shadow=(), allow_shadow=None, allow=(
        AuthzEntry("default", (Principal("id", BATCH), Principal("id", WEB))),))
    assert ask(config, WEB) == ALLOWED_BY_DEFAULT
    assert ask(config, BATCH, "DELETE", "/anything") == ALLOWED_BY_DEFAULT
    assert ask(config, DB) == NO_MATCH
    assert ask(config, CHECKER) == NO_MATCH
    assert ask(config, PLAINTEXT) == NO_MATCH


def test_declared_with_no_caller_has_no_default_entry() -> None:
    config = compile_authz(inputs("declared", ()), ServicePolicy(), None)
    assert config.allow == ()
    assert ask(config, WEB) == NO_MATCH


def test_allow_accepts_every_workload_but_never_the_checker() -> None:
    config = compile_authz(inputs("allow", ()), ServicePolicy(), None)
    assert config.allow == (AuthzEntry("default", (Principal("prefix", f"spiffe://{TD}/svc/"),)),)
    for source in (WEB, DB, BATCH, API):
        assert ask(config, source, "POST", "/x") == ALLOWED_BY_DEFAULT
    assert ask(config, CHECKER) == NO_MATCH
    assert ask(config, "spiffe://other.mesh/svc/web") == NO_MATCH
    assert ask(config, PLAINTEXT) == NO_MATCH


def test_deny_accepts_only_allow_rules() -> None:
    config = compile_authz(inputs("deny", ("web", "batch")), policy(allow=(rule("web", methods=("GET",)),)), None)
    assert [entry.name for entry in config.allow] == ["allow[0]"]
    assert ask(config, WEB) == (True, "allow[0]", ())
    assert ask(config, WEB, "POST") == NO_MATCH
    assert ask(config, BATCH) == NO_MATCH


# --- allow and deny rules -----------------------------------------------------------------------------------------

def test_an_allow_rule_narrows_what_a_declared_caller_may_do_and_no_one_else() -> None:
    config = compile_authz(inputs("declared", ("web", "batch")),
                           policy(allow=(rule("web", methods=("GET",), paths=("/orders", "/orders/*")),)), None)
    assert config.allow[-1] == AuthzEntry("default", (Principal("id", BATCH), Principal("id", WEB)),
                                          excluded=(Principal("id", WEB),))
    assert ask(config, WEB, "GET", "/orders/7") == (True, "allow[0]", ())
    assert ask(config, WEB, "POST", "/orders/7") == NO_MATCH
    assert ask(config, WEB, "GET", "/admin") == NO_MATCH
    assert ask(config, BATCH, "POST", "/admin") == ALLOWED_BY_DEFAULT


def test_an_allow_rule_naming_an_id_narrows_the_service_too() -> None:
    config = compile_authz(inputs(), policy(allow=(rule(WEB, methods=("GET",)),)), None)
    assert ask(config, WEB, "POST") == NO_MATCH


def test_an_allow_rule_with_no_source_adds_to_the_default_and_excludes_no_one() -> None:
    config = compile_authz(inputs("declared", ("web",)), policy(allow=(rule(paths=("/public/*",)),)), None)
    assert config.allow[-1].excluded == ()
    assert ask(config, DB, "GET", "/public/a") == (True, "allow[0]", ())
    assert ask(config, DB, "GET", "/private") == NO_MATCH
    assert ask(config, WEB, "GET", "/private") == ALLOWED_BY_DEFAULT
    assert ask(config, CHECKER, "GET", "/public/a") == NO_MATCH  # "any source" is never the checker


def test_deny_wins_over_allow() -> None:
    config = compile_authz(inputs("deny"), policy(allow=(rule("web"),), deny=(rule("web", paths=("/admin/*",)),)),
                           None)
    assert ask(config, WEB, "GET", "/admin/users") == (False, "deny[0]", ())
    assert ask(config, WEB, "GET", "/orders") == (True, "allow[0]", ())


def test_a_deny_rule_with_no_source_denies_plaintext_clients_too() -> None:
    config = compile_authz(inputs(), policy(deny=(rule(methods=("DELETE",)),), mtls="permissive"), None)
    assert ask(config, WEB, "DELETE") == (False, "deny[0]", ())
    assert ask(config, PLAINTEXT, "DELETE") == (False, "deny[0]", ())
    assert ask(config, PLAINTEXT, "GET") == ALLOWED_BY_DEFAULT


def test_several_matching_entries_report_the_first_by_name_as_envoy_does() -> None:
    """Envoy's RBAC engine keeps policies in a sorted map: deny[10] comes before deny[1] and deny[2]."""
    denies = tuple(rule("web", paths=(f"/p{index}",)) for index in range(10)) + (rule("web"),)
    config = compile_authz(inputs(), policy(deny=(*denies[:2], rule("web", methods=("GET",)), *denies[3:])), None)
    assert ask(config, WEB, "GET", "/p1") == (False, "deny[10]", ())
    assert ask(config, WEB, "POST", "/p0") == (False, "deny[0]", ())
    assert ask(config, WEB, "GET", "/p5") == (False, "deny[10]", ())
    assert ask(config, WEB, "GET", "/z") == (False, "deny[10]", ())


# --- shadow rules -------------------------------------------------------------------------------------------------

def test_a_shadow_deny_denies_nothing_and_says_it_would() -> None:
    config = compile_authz(inputs(), policy(deny=(rule("web", mode="shadow"), rule("web", paths=("/admin",)))), None)
    assert [entry.name for entry in config.deny] == ["deny[1]"]
    assert [entry.name for entry in config.deny_shadow] == ["deny[0]"]
    assert ask(config, WEB) == (True, "default", ("deny[0]",))
    assert ask(config, WEB, "GET", "/admin") == (False, "deny[1]", ("deny[0]",))
    assert ask(config, BATCH) == NO_MATCH


def test_a_shadow_allow_changes_nothing_enforced_and_says_what_it_would_deny() -> None:
    config = compile_authz(inputs("declared", ("web", "batch")), policy(allow=(rule("web", methods=("GET",),
                                                                                  mode="shadow"),)), None)
    assert config.allow == (AuthzEntry("default", (Principal("id", BATCH), Principal("id", WEB))),)
    assert config.allow_shadow == (
        AuthzEntry("allow[0]", (Principal("id", WEB),), methods=("GET",)),
        AuthzEntry("default", (Principal("id", BATCH), Principal("id", WEB)), excluded=(Principal("id", WEB),)))
    assert ask(config, WEB, "POST") == (True, "default", ("none",))
    assert ask(config, WEB, "GET") == ALLOWED_BY_DEFAULT
    assert ask(config, BATCH, "POST") == ALLOWED_BY_DEFAULT
    # Denied either way; Envoy's ALLOW filter still runs its shadow rules and logs their denial too.
    assert ask(config, DB, "GET") == (False, "none", ("none",))


def test_the_allow_filter_and_its_shadow_rules_see_only_what_the_deny_filter_lets_through() -> None:
    config = compile_authz(inputs(), policy(allow=(rule("web", methods=("GET",), mode="shadow"),),
                                            deny=(rule("web", methods=("POST",)),)), None)
    assert ask(config, WEB, "POST") == (False, "deny[0]", ())
    assert ask(config, WEB, "PUT") == (True, "default", ("none",))


# --- the run-time deny --------------------------------------------------------------------------------------------

def test_the_run_time_deny_comes_after_the_inventory_denies() -> None:
    override = AuthzOverride(("spiffe://lab.mesh/svc/batch", "web"), "r1")
    config = compile_authz(inputs("declared", ("web", "batch")), policy(deny=(rule("db"),)), override)
    assert config.deny == (AuthzEntry("deny[0]", (Principal("id", DB),)),
                           AuthzEntry("runtime-deny", (Principal("id", BATCH), Principal("id", WEB))))
    assert ask(config, WEB) == (False, "runtime-deny", ())
    assert ask(config, BATCH, "POST", "/x") == (False, "runtime-deny", ())


def test_an_empty_run_time_deny_adds_no_entry() -> None:
    assert compile_authz(inputs(), ServicePolicy(), AuthzOverride((), "r2")).deny == ()


def test_a_run_time_deny_of_plaintext_clients() -> None:
    config = compile_authz(inputs(), policy(mtls="permissive"), AuthzOverride(("unauthenticated",)))
    assert ask(config, PLAINTEXT) == (False, "runtime-deny", ())
    assert ask(config, WEB) == ALLOWED_BY_DEFAULT


# --- permissive mode ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("default", ["declared", "allow", "deny"])
def test_plaintext_clients_are_allowed_by_default_on_a_permissive_service_only(default: AuthzDefault) -> None:
    permissive = compile_authz(inputs(default), policy(mtls="permissive"), None)
    assert Principal("unauthenticated") in permissive.allow[-1].principals
    assert ask(permissive, PLAINTEXT) == ALLOWED_BY_DEFAULT
    strict = compile_authz(inputs(default), policy(), None)
    assert ask(strict, PLAINTEXT) == NO_MATCH


def test_an_allow_rule_naming_unauthenticated_narrows_plaintext_clients() -> None:
    config = compile_authz(inputs(), policy(allow=(rule("unauthenticated", paths=("/public/*",)),), mtls="permissive"),
                           None)
    assert config.allow[-1].excluded == (Principal("unauthenticated"),)
    assert ask(config, PLAINTEXT, "GET", "/public/x") == (True, "allow[0]", ())
    assert ask(config, PLAINTEXT, "GET", "/private") == NO_MATCH
    assert ask(config, WEB, "GET", "/private") == ALLOWED_BY_DEFAULT


def test_the_checker_is_never_allowed_on_the_app_chain() -> None:
    for default in ("declared", "allow", "deny"):
        config = compile_authz(inputs(default, ("web",)), policy(allow=(rule(), rule("web")), mtls="permissive"),  # type: ignore[arg-type]
                               None)
        assert ask(config, CHECKER) == NO_MATCH


# --- matching -----------------------------------------------------------------------------------------------------

PATHS = [
    ("/orders/*", "/orders/1", True), ("/orders/*", "/orders/", True), ("/orders/*", "/orders", False),
    ("/orders/*", "/ordersx/1", False), ("/orders", "/orders", True), ("/orders", "/orders/1", False),
    ("/orders", "/orders?id=1", True), ("/orders/*", "/orders/1?x=/y", True), ("/orders", "/Orders", False),
    ("/orders", "/orders#frag", True), ("/*", "/anything/at/all", True),
]


@pytest.mark.parametrize(("written", "path", "allowed"), PATHS)
def test_paths_exact_and_prefix_ignore_the_query(written: str, path: str, allowed: bool) -> None:
    config = compile_authz(inputs("deny"), policy(allow=(rule("web", paths=(written,)),)), None)
    assert ask(config, WEB, "GET", path)[0] is allowed


def test_methods_match_exactly() -> None:
    config = compile_authz(inputs("deny"), policy(allow=(rule("web", methods=("GET", "HEAD")),)), None)
    assert [ask(config, WEB, method)[0] for method in ("GET", "HEAD", "POST", "get")] == [True, True, False, False]


def test_headers_match_by_name_in_any_case_and_exact_value() -> None:
    config = compile_authz(inputs("deny"), policy(allow=(rule("web", headers=(("x-team", "blue"), ("x-env", "1"))),)),
                           None)
    assert ask(config, WEB, headers=(("X-Team", "blue"), ("x-env", "1")))[0] is True
    assert ask(config, WEB, headers=(("x-team", "Blue"), ("x-env", "1")))[0] is False
    assert ask(config, WEB, headers=(("x-team", "blue"),))[0] is False


def test_a_tcp_connection_has_only_a_source() -> None:
    config = compile_authz(inputs("declared", ("api",), "tcp"), policy(deny=(rule("web"),)), None)
    assert decide(config, AuthzRequest(API)) == AuthzDecision(True, "default")
    assert decide(config, AuthzRequest(WEB)) == AuthzDecision(False, "deny[0]")
    assert decide(config, AuthzRequest(DB)) == AuthzDecision(False, "none")


def test_a_full_policy_compiles_to_entries_in_order() -> None:
    full = policy(allow=(rule("web", "unauthenticated", methods=("GET",)), rule("db", mode="shadow"), rule()),
                  deny=(rule("web", paths=("/admin/*",)), rule(headers=(("x-debug", "1"),), mode="shadow"),
                        rule("batch")),
                  mtls="permissive")
    config = compile_authz(inputs("allow", ("web",)), full, AuthzOverride(("db",)))
    svc = Principal("prefix", f"spiffe://{TD}/svc/")
    anyone = (svc, Principal("unauthenticated"))
    default = (svc, Principal("unauthenticated"))
    assert config == AuthzConfig(
        deny=(AuthzEntry("deny[0]", (Principal("id", WEB),), paths=(parse_rule_path("/admin/*"),)),
              AuthzEntry("deny[2]", (Principal("id", BATCH),)),
              AuthzEntry("runtime-deny", (Principal("id", DB),))),
        deny_shadow=(AuthzEntry("deny[1]", anyone, headers=(("x-debug", "1"),)),),
        allow=(AuthzEntry("allow[0]", (Principal("id", WEB), Principal("unauthenticated")), methods=("GET",)),
               AuthzEntry("allow[2]", anyone),
               AuthzEntry("default", default, excluded=(Principal("unauthenticated"), Principal("id", WEB)))),
        allow_shadow=(AuthzEntry("allow[0]", (Principal("id", WEB), Principal("unauthenticated")), methods=("GET",)),
                      AuthzEntry("allow[1]", (Principal("id", DB),)),
                      AuthzEntry("allow[2]", anyone),
                      AuthzEntry("default", default, excluded=(Principal("unauthenticated"), Principal("id", DB),
                                                               Principal("id", WEB)))))


# --- identities and inputs ----------------------------------------------------------------------------------------

def test_source_id() -> None:
    assert source_id(TD, "web") == WEB
    assert source_id(TD, WEB) == WEB
    assert source_id(TD, "unauthenticated") is None


def test_inbound_inputs_round_trip_through_json_text() -> None:
    value = inputs("deny", ("batch", "web"), "grpc")
    data = json.loads(json.dumps(value.to_json()))
    assert data == {"service": "api", "version": "v1", "protocol": "grpc", "trust_domain": TD,
                    "authz_default": "deny", "callers": ["batch", "web"]}
    assert InboundInputs.from_json(data) == value
    with pytest.raises(ValueError):
        InboundInputs.from_json({**data, "authz_default": "maybe"})


# --- decide against the rules read directly ---------------------------------------------------------------------

NAMES = ("web", "api", "db", "batch")
SOURCES = (WEB, API, DB, BATCH, CHECKER, "spiffe://other.mesh/svc/web", PLAINTEXT)
rule_sources = st.lists(st.sampled_from((*NAMES, "unauthenticated", WEB, BATCH)), unique=True, max_size=2)
rules = st.builds(lambda sources, methods, paths, headers, mode: rule(*sources, methods=tuple(methods),
                                                                      paths=tuple(paths), headers=tuple(headers),
                                                                      mode=mode),
                  rule_sources, st.lists(st.sampled_from(("GET", "POST")), unique=True, max_size=1),
                  st.lists(st.sampled_from(("/a", "/a/*", "/b")), unique=True, max_size=2),
                  st.lists(st.sampled_from((("x-a", "1"), ("x-b", "2"))), unique=True, max_size=1),
                  st.sampled_from(("enforce", "enforce", "shadow")))
requests = st.builds(AuthzRequest, st.sampled_from(SOURCES), st.sampled_from(("GET", "POST")),
                     st.sampled_from(("/", "/a", "/a/1", "/a?x", "/b/1")),
                     st.lists(st.sampled_from((("x-a", "1"), ("X-B", "2"), ("x-a", "2"))), max_size=2).map(tuple))


def written_source(source: str) -> str | None:
    return source_id(TD, source)


def rule_matches(written: AuthzRule, request: AuthzRequest) -> bool:
    """The Semantics of a rule, read from the rule itself (not from compiled entries)."""
    if written.sources:
        if request.source not in {written_source(source) for source in written.sources}:
            return False
    elif request.source is not None and not request.source.startswith(f"spiffe://{TD}/svc/"):
        return False
    path = (request.path or "").split("?")[0]
    return ((not written.methods or request.method in written.methods)
            and (not written.paths or any(path == p.value if p.kind == "exact" else path.startswith(p.value)
                                          for p in written.paths))
            and all((name, value) in {(n.lower(), v) for n, v in request.headers} for name, value in written.headers))


def oracle(default: AuthzDefault, callers: tuple[str, ...], written: ServicePolicy, deny_from: tuple[str, ...],
           request: AuthzRequest, modes: tuple[str, ...] = ("enforce",)) -> bool:
    if any(rule.mode == "enforce" and rule_matches(rule, request) for rule in written.authz.deny):
        return False
    if request.source in {written_source(source) for source in deny_from}:
        return False
    allows = [rule for rule in written.authz.allow if rule.mode in modes]
    if any(rule_matches(rule, request) for rule in allows):
        return True
    if request.source in {written_source(source) for rule in allows for source in rule.sources}:
        return False  # named by an allow rule: only allow rules decide for it
    if request.source is None:
        return written.mtls == "permissive"
    if default == "declared":
        return request.source in {written_source(caller) for caller in callers}
    return default == "allow" and request.source.startswith(f"spiffe://{TD}/svc/")


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(("declared", "allow", "deny")), st.lists(st.sampled_from(NAMES), unique=True).map(tuple),
       st.lists(rules, max_size=3).map(tuple), st.lists(rules, max_size=3).map(tuple),
       st.sampled_from(("strict", "permissive")), st.lists(st.sampled_from(("web", BATCH, "unauthenticated")),
                                                           unique=True, max_size=2).map(tuple),
       st.lists(requests, min_size=1, max_size=8))
def test_decide_agrees_with_the_rules_read_directly(default: AuthzDefault, callers: tuple[str, ...],
                                                    allow: tuple[AuthzRule, ...], deny: tuple[AuthzRule, ...],
                                                    mtls: str, deny_from: tuple[str, ...],
                                                    asked: list[AuthzRequest]) -> None:
    written = policy(allow, deny, mtls)
    config = compile_authz(inputs(default, callers), written, AuthzOverride(deny_from))
    for request in asked:
        decision = decide(config, request)
        assert decision.allowed is oracle(default, callers, written, deny_from, request), (request, decision)
        if request.source == CHECKER:
            assert not decision.allowed
        shadow_denies = {f"deny[{i}]" for i, r in enumerate(deny) if r.mode == "shadow" and rule_matches(r, request)}
        assert set(decision.would_deny) - {"none"} == shadow_denies
        enforced_deny = any(r.mode == "enforce" and rule_matches(r, request) for r in deny) or \
            request.source in {written_source(source) for source in deny_from}
        if any(r.mode == "shadow" for r in allow) and not enforced_deny:
            would_allow = oracle(default, callers, written, deny_from, request, ("enforce", "shadow"))
            assert ("none" in decision.would_deny) is not would_allow, (request, decision)
