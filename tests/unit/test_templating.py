"""Jinja2 in inventory variables: rendered as Ansible 2.19 renders them (native types for one expression),
with Jinja2's own filters only; what needs Ansible is refused with file, line and key."""

from __future__ import annotations

from typing import Any

import pytest
from meshvars_helpers import Fleet, find

from mesh.errors import InventoryError
from mesh.inventory.resolve import host_vars_with_origins
from mesh.inventory.templating import Templating, ansible_concat, is_template


def render(text: str, key: str, host: str = "h1", fleet: Fleet | None = None) -> Any:
    fleet = fleet or Fleet("").host("h1", text, group="web").host("h2", "x: two\n", group="web")
    return Templating(fleet.data, lambda name: host_vars_with_origins(fleet.data, name)).render(host, key)


def refusal(text: str, key: str) -> InventoryError:
    with pytest.raises(InventoryError) as caught:
        render(text, key)
    return caught.value


@pytest.mark.parametrize(
    ("value", "expected"),
    [("'{{ 8080 }}'", 8080), ("\"{{ '8080' }}\"", "8080"), ("'{{ 80 }}{{ 80 }}'", "8080"), ("'x{{ 1 }}'", "x1"),
     ("'{{ [1, 2] }}'", [1, 2]), ("'{{ base + 1 }}'", 11), ("'  {{ 5 }}'", "  5"), ("'{{ {\"a\": 1} }}'", {"a": 1}),
     ("'{{ none_set | default(7) }}'", 7), ("'{{ range(3) | list }}'", [0, 1, 2]), ("'plain'", "plain"),
     ("'{{ base is even }}'", True), ("\"{{ 'a,b' | replace(',', ';') | upper }}\"", "A;B")],
)
def test_native_types_as_ansible(value: str, expected: Any) -> None:
    assert render(f"base: 10\nv: {value}\n", "v") == expected


def test_magic_variables() -> None:
    fleet = Fleet("").host("h1.example.com", "a: '{{ inventory_hostname }}'\nb: '{{ inventory_hostname_short }}'\n"
                                            "c: '{{ groups.web }}'\nd: '{{ group_names }}'\n"
                                            "e: \"{{ hostvars['h2'].x }}\"\nf: '{{ groups.all | length }}'\n",
                           group="web")
    fleet.host("h2", "x: '{{ inventory_hostname }}-ok'\n", group="web")
    got = {key: render("", key, "h1.example.com", fleet) for key in "abcdef"}
    assert got == {"a": "h1.example.com", "b": "h1", "c": ["h1.example.com", "h2"], "d": ["web"], "e": "h2-ok",
                   "f": 2}


def test_nested_values_render_in_lists_and_dicts() -> None:
    value = render("base: 8000\nmesh_workloads:\n  - {service: web, port: '{{ base + 80 }}'}\n", "mesh_workloads")
    assert value == [{"service": "web", "port": 8080}]


@pytest.mark.parametrize("expression", ["lookup('env', 'HOME')", "query('inventory_hostnames', 'all')",
                                        "q('file', 'x')"])
def test_lookups_are_refused(expression: str) -> None:
    error = refusal(f"a: 1\nsecret: \"{{{{ {expression} }}}}\"\n", "secret")
    assert (error.origin.line, error.key) == (2, "secret")
    assert "Ansible lookup" in str(error) and error.origin.file.endswith("host_vars/h1.yml")


def test_ansible_filters_are_refused_with_did_you_mean() -> None:
    error = refusal("a: 1\nb: '{{ a | to_yaml }}'\n", "b")
    assert (error.origin.line, error.key) == (2, "b")
    assert "'to_yaml' is not a Jinja2 filter" in str(error) and "Ansible" in str(error)
    assert "did you mean" in str(refusal("a: [1]\nb: '{{ a | frist }}'\n", "b"))
    assert "ipaddr" in str(refusal("a: 1\nb: '{{ a | ansible.utils.ipaddr }}'\n", "b"))


def test_ansible_tests_are_refused() -> None:
    error = refusal("a: 1\nb: '{{ a is truthy }}'\n", "b")
    assert "'truthy' is not a Jinja2 test" in str(error)


def test_undefined_variable_with_did_you_mean() -> None:
    error = refusal("base_port: 1\nb: '{{ base_prot + 1 }}'\n", "b")
    assert (error.origin.line, error.key) == (2, "b")
    assert "undefined variable 'base_prot'" in str(error) and "did you mean 'base_port'" in str(error)
    assert "undefined" in str(refusal("b: '{{ [nothing] }}'\n", "b"))


def test_recursion_loops_are_refused() -> None:
    error = refusal("a: '{{ b }}'\nb: '{{ c }}'\nc: '{{ a }}'\n", "a")
    assert "loop" in str(error) and "a -> b -> c -> a" in str(error)
    assert "loop" in str(refusal("a: '{{ a + 1 }}'\n", "a"))


def test_syntax_errors_and_sandbox() -> None:
    assert "syntax error" in str(refusal("a: '{{ 1 + }}'\n", "a"))
    assert "sandbox" in str(refusal("a: \"{{ ''.__class__.__mro__ }}\"\n", "a"))
    assert "fails" in str(refusal("a: '{{ 1 / 0 }}'\n", "a"))


def test_errors_inside_a_list_name_the_path_and_the_line() -> None:
    fleet = Fleet().controller().host("vm1", "mesh_workloads:\n  - service: web\n    port: '{{ now() }}'\n")
    find(fleet.errors(), "host_vars/vm1.yml", 3, "mesh_workloads[0].port", "Ansible's own")


def test_an_error_in_a_referenced_variable_names_that_variable() -> None:
    fleet = Fleet().controller().host("vm1", "p: \"{{ lookup('env', 'P') }}\"\nmesh_workloads:\n"
                                              "  - {service: web, port: '{{ p }}'}\n")
    find(fleet.errors(), "host_vars/vm1.yml", 1, "p", "Ansible lookup")


def test_unused_variables_are_not_rendered() -> None:
    fleet = Fleet().controller().host("vm1", "db_password: \"{{ lookup('env', 'P') }}\"\n"
                                              "mesh_workloads: [{service: web, port: 80}]\n")
    assert fleet.build().workloads[0].port == 80


def test_helpers() -> None:
    assert is_template("{{ x }}") and is_template("{% if x %}y{% endif %}") and not is_template("x { y }")
    assert ansible_concat([]) == "" and ansible_concat([5]) == 5 and ansible_concat(["a", 5]) == "a5"


def test_unsafe_values_are_never_rendered() -> None:
    text = ("a: !unsafe \"{{ 7 * 7 }}\"\nb: '{{ a }}'\nc: !unsafe ['{{ x }}', {k: '{{ y }}'}]\nd: !unsafe 12\n"
            "e: !unsafe \"{{ 'a' * 3000000000 }}\"\n")
    assert render(text, "a") == "{{ 7 * 7 }}"
    assert render(text, "b") == "{{ 7 * 7 }}"  # a template's result is not templated again
    assert render(text, "c") == ["{{ x }}", {"k": "{{ y }}"}]
    assert render(text, "d") == 12
    assert render(text, "e") == "{{ 'a' * 3000000000 }}"
    assert not is_template(render(text, "a"))


@pytest.mark.parametrize(("expression", "words"), [("7**999999999", "`**`"), ("'a' * 3000000000", "`*`")])
def test_unbounded_templates_name_file_line_and_key(expression: str, words: str) -> None:
    error = refusal(f"a: 1\nansible_host: \"{{{{ {expression} }}}}\"\n", "ansible_host")
    assert (error.origin.line, error.key) == (2, "ansible_host")
    assert "sandbox" in str(error) and words in str(error)


@pytest.mark.parametrize("failure", [MemoryError, RecursionError])
def test_memory_and_recursion_errors_become_inventory_errors(monkeypatch: pytest.MonkeyPatch,
                                                             failure: type[BaseException]) -> None:
    from mesh.inventory import templating

    def fail(*_: Any) -> Any:
        raise failure()

    monkeypatch.setattr(templating, "bounded_concat", fail)
    error = refusal("a: 1\nansible_host: '{{ a }}'\n", "ansible_host")
    assert (error.origin.line, error.key) == (2, "ansible_host") and error.exit_code == 4


@pytest.mark.parametrize("failure", [MemoryError, RecursionError])
def test_loading_and_checking_never_end_in_an_unexpected_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
                                                               failure: type[BaseException]) -> None:
    from mesh.errors import InventoryErrors
    from mesh.inventory import check, loader

    def fail(*_: Any, **__: Any) -> Any:
        raise failure()

    path = tmp_path / "hosts.yaml"
    path.write_text("all:\n  hosts:\n    h1:\n")
    monkeypatch.setattr(check, "build_mesh", fail)
    with pytest.raises(InventoryErrors) as caught:
        check.check_inventory(loader.load_inventory(str(path)), str(path))
    assert caught.value.exit_code == 4 and str(path) in str(caught.value)
    monkeypatch.setattr(loader, "_load_inventory", fail)
    with pytest.raises(InventoryError) as refused:
        loader.load_inventory(str(path))
    assert refused.value.exit_code == 4 and str(path) in str(refused.value)
