"""A route's path regex is checked when the inventory is read (exit 4), not first by Envoy at deploy time: what
mesh's check accepts, the real Envoy (RE2, its default program size limit) accepts too. Each pattern is put in a
route of a minimal Envoy config and run through `envoy --mode validate`."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from mesh.inventory.policy_values import check_regex
from mesh.inventory.values import BadValue

# Envoy and mesh agree on each: accepted by both, or refused by both.
AGREE = [
    "/api/v[0-9]+", "^/orders/[0-9]{1,10}$", "(?i)/Orders/.*", "(?s).", "[\\d]+", "\\bword\\b", "(?:a|b)*?",
    "\\A/x", "\\x41", "[^]a]", "[]a]", "(?m)^x$", "(?-i:a)", "\\s\\S\\w\\W", "(?P<name>a)",
    "^/(api|web|admin|orders|items|users|login|logout)/[a-zA-Z0-9_-]+/[0-9]+$", ".*", "(a+)+", "a{2,5}",
    # RE2 lacks these
    "(a)\\1", "/a(?=b)", "/a(?!b)", "(?<=a)b", "(?<!a)b", "a++", "a*+", "a?+", "x{2}+", "(?>a)", "(?P<n>a)(?P=n)",
    "\\Z", "(?x)a", "(?a)x", "(?#c)a", "\\u00e9", "[\\1]", "[a\\b]", "[b[:foo:]]", "[[:alpha:]]+",
    # Python refuses these as well
    "(a", "a{2,1}", "\\8", "[a-\\d]", "\\e", "\\h", "\\Ka",
    # Envoy's limit on a regex's program size (100 instructions)
    "a{97}", "a{1001}", ".{49}", "\\w{33}", "[^/]{49}", "\\W{20}", "(ab){50}", "[a-z\\d]{49}",
    ".{48}", "a{95}", "\\w{32}", "[^/]{48}", "(?:x{3}){30}",
]
# Envoy accepts, mesh refuses: Python's re (the first filter) lacks the syntax, or the size estimate errs large.
STRICTER = ["(?<n>a)", "\\pL", "\\p{Greek}", "\\Q.\\E", "\\z", "\\C", "[à-ü]{30}"]


def envoy_accepts(folder: Path, patterns: list[str]) -> tuple[bool, str]:
    """Whether `envoy --mode validate` accepts a route config with one route per pattern, and what it said."""
    routes = [{"match": {"safe_regex": {"regex": pattern}}, "direct_response": {"status": 200}} for pattern in patterns]
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "probe", "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": routes}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    listener = {"name": "probe", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": manager}]}]}
    config = folder / "envoy.json"
    config.write_text(json.dumps({"static_resources": {"listeners": [listener]}}))
    envoy = shutil.which("envoy")
    assert envoy, "envoy is not on PATH (mesh's environment ships it)"
    done = subprocess.run([envoy, "--mode", "validate", "-c", str(config), "-l", "error"], capture_output=True,
                          text=True, timeout=60, check=False)
    return done.returncode == 0, done.stdout + done.stderr


def mesh_accepts(pattern: str) -> bool:
    try:
        check_regex(pattern)
    except BadValue:
        return False
    return True


@pytest.mark.parametrize("pattern", AGREE)
def test_mesh_and_envoy_agree(tmp_path: Path, pattern: str) -> None:
    accepted, said = envoy_accepts(tmp_path, [pattern])
    assert mesh_accepts(pattern) == accepted, said


@pytest.mark.parametrize("pattern", STRICTER)
def test_mesh_is_stricter_than_envoy_only_here(tmp_path: Path, pattern: str) -> None:
    accepted, said = envoy_accepts(tmp_path, [pattern])
    assert accepted and not mesh_accepts(pattern), said


def test_random_patterns_mesh_accepts_envoy_accepts(tmp_path: Path) -> None:
    pieces = ["a", "b", "/", ".", "*", "+", "?", "(", ")", "(?:", "[", "]", "^", "$", "|", "\\d", "\\w", "\\s", "\\b",
              "{2}", "{1,3}", "{9}", "[^/]", "[a-z]", "(?i)", "(?=", "\\1", "é", "-", "0", ",", "[[:alpha:]]", "[:",
              ":]", "\\x41", "{,3}", "\\.", "\\-"]
    chooser = random.Random(20)
    patterns = ["".join(chooser.choice(pieces) for _ in range(chooser.randint(1, 14))) for _ in range(3000)]
    accepted = sorted({pattern for pattern in patterns if mesh_accepts(pattern)})
    assert len(accepted) > 200  # the generator makes enough valid patterns to mean something
    ok, said = envoy_accepts(tmp_path, accepted)
    assert ok, said
