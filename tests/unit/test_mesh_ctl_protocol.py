"""The controller's side of mesh-ctl (mesh.controller.protocol): the commands it sends, the `apply` bundle, and the
parsing of what the verbs print. Pure; the script itself is run in test_mesh_ctl_script.py."""

from __future__ import annotations

import hashlib
import io
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from mesh.config import compute_proxy_config
from mesh.controller import protocol
from mesh.controller.protocol import BundleProxy, CertState, CtlProtocolError
from mesh.render import ProxyFiles, host_validation, render_proxy_files, static_bootstrap
from mesh.testing.loopback import proxy_config_in, two_service_mesh

HOME = "/etc/mesh/proxies/web-8080"


@pytest.fixture(scope="module")
def files() -> ProxyFiles:
    loop = two_service_mesh(8080)
    return render_proxy_files(proxy_config_in(compute_proxy_config(loop.mesh, loop.web), Path(HOME)))


def _resources(files: ProxyFiles) -> list[str]:
    return [file.path for file in files.files if file.kind != "bootstrap"]


# --- commands ---

def test_commands_are_the_verb_and_checked_words() -> None:
    assert protocol.command("state") == "state"
    assert protocol.command("apply") == "apply"
    assert protocol.command("csr", "web-8080") == "csr web-8080"
    assert protocol.command("csr", "api-api-v2_1.x") == "csr api-api-v2_1.x"  # a Docker container name
    assert protocol.command("install", "checker", "20261206T111406-1b4b81") == "install checker 20261206T111406-1b4b81"


@pytest.mark.parametrize(("verb", "args", "message"), [
    ("shell", (), "no verb 'shell'"),
    ("state", ("x",), "takes 0 argument"),
    ("csr", (), "takes 1 argument"),
    ("csr", ("web 8080",), "not an identity name"),
    ("csr", ("../web",), "not an identity name"),
    ("csr", ("$(id)",), "not an identity name"),
    ("install", ("web", "2026-12-06"), "not a key version"),
    ("install", ("web", "20261206T111406-1B4B81"), "not a key version"),
])
def test_a_command_mesh_ctl_would_refuse_is_not_made(verb: str, args: tuple[str, ...], message: str) -> None:
    with pytest.raises(CtlProtocolError, match=message.replace("(", r"\(").replace(")", r"\)")):
        protocol.command(verb, *args)


def test_the_packaged_script_is_a_posix_sh_script() -> None:
    text = protocol.script_text()
    assert text.startswith("#!/bin/sh\n")
    assert protocol.script_path().name == "mesh-ctl.sh"


# --- the bundle ---

def test_a_bundle_part_holds_the_changed_resource_files_in_move_order_and_the_stale_ones(files: ProxyFiles) -> None:
    lds, eds = f"{HOME}/xds/lds.yaml", f"{HOME}/xds/eds.upstream-api.yaml"
    part = protocol.bundle_for(files, [lds, eds], [f"{HOME}/xds/eds.gone.yaml"])
    assert part.name == files.proxy
    assert [relpath for relpath, _content in part.files] == ["xds/eds.upstream-api.yaml", "xds/lds.yaml"]
    assert dict(part.files)["xds/lds.yaml"] == files.file(lds).content
    assert part.remove == ("xds/eds.gone.yaml",)


def test_the_validate_config_is_the_static_equivalent_of_every_file(files: ProxyFiles) -> None:
    """Whatever changed, Envoy checks all of the proxy's files as they will be: nothing else is read on the host
    but the key, certificate and trust bundle the secrets name."""
    part = protocol.bundle_for(files, [f"{HOME}/xds/lds.yaml"])
    assert yaml.safe_load(part.validate_yaml) == static_bootstrap(files, dynamic=False)
    everything = protocol.bundle_for(files, _resources(files))
    assert everything.validate_yaml == part.validate_yaml
    assert part.validate_yaml == host_validation(files, staging_dir=f"{HOME}/.ctl-staging", user=None).config
    named = {value for value in _strings(yaml.safe_load(part.validate_yaml)) if value.startswith("/etc/")}
    assert named == {f"{HOME}/tls/cert.pem", f"{HOME}/tls/key.pem", f"{HOME}/ca.pem", f"{HOME}/admin/admin.sock",
                     HOME}  # the folder watched for the `tls` link's swap


def _strings(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [found for value in node.values() for found in _strings(value)]
    if isinstance(node, list):
        return [found for value in node for found in _strings(value)]
    return []


@pytest.mark.parametrize(("changed", "stale", "message"), [
    ([f"{HOME}/envoy.yaml"], [], "the bootstrap is the deploy's"),
    ([f"{HOME}/xds/nope.yaml"], [], "not one of its files"),
    (["/etc/passwd"], [], "not one of its files"),
    ([], [f"{HOME}/ca.pem"], "cannot remove"),
    ([], [f"{HOME}/xds/lds.yaml"], "both a file of the proxy and stale"),
    ([], [f"{HOME}/xds/../tls/key.pem"], "not a file mesh-ctl moves"),
])
def test_a_bundle_part_refuses_what_mesh_ctl_must_not_touch(files: ProxyFiles, changed: list[str], stale: list[str],
                                                            message: str) -> None:
    with pytest.raises(CtlProtocolError, match=message):
        protocol.bundle_for(files, changed, stale)


def test_the_bundle_is_a_deterministic_ustar_archive_of_regular_files(files: ProxyFiles) -> None:
    web = protocol.bundle_for(files, _resources(files), [f"{HOME}/xds/eds.gone.yaml"])
    other = BundleProxy("checker-like", "static_resources: {}\n", (("xds/cds.yaml", "resources: []\n"),))
    data = protocol.apply_bundle([web, other])

    assert data == protocol.apply_bundle([web, other])
    assert data[257:265] == b"ustar\x0000"
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        members = archive.getmembers()
        assert [member.name for member in members] == [
            f"{files.proxy}/validate.yaml", *[f"{files.proxy}/{relpath}" for relpath, _content in web.files],
            f"{files.proxy}/remove", "checker-like/validate.yaml", "checker-like/xds/cds.yaml"]
        assert {(member.type, member.mode, member.uid, member.gid, member.mtime) for member in members} == {
            (tarfile.REGTYPE, 0o644, 0, 0, 0)}
        read = archive.extractfile(f"{files.proxy}/remove")
        assert read is not None and read.read() == b"xds/eds.gone.yaml\n"
        read = archive.extractfile(f"{files.proxy}/validate.yaml")
        assert read is not None and read.read().decode() == web.validate_yaml


def test_a_bundle_refuses_an_identity_twice_or_more_than_mesh_ctl_reads(files: ProxyFiles) -> None:
    part = protocol.bundle_for(files, [f"{HOME}/xds/lds.yaml"])
    with pytest.raises(CtlProtocolError, match="an identity twice"):
        protocol.apply_bundle([part, part])
    huge = BundleProxy("web-8080", "x" * (protocol.MAX_BUNDLE_BYTES + 1), ())
    with pytest.raises(CtlProtocolError, match="at most 8388608"):
        protocol.apply_bundle([huge])


@pytest.mark.parametrize(("name", "files", "remove"), [
    ("../web", (), ()),
    ("web", (("envoy.yaml", ""),), ()),
    ("web", (("xds/../../x.yaml", ""),), ()),
    ("web", (("xds/LDS.yaml", ""),), ()),
    ("web", (("xds/lds.yaml", ""), ("xds/lds.yaml", "")), ()),
    ("web", (), ("tls/key.pem",)),
])
def test_a_bundle_part_mesh_ctl_would_refuse_cannot_be_made(name: str, files: tuple[tuple[str, str], ...],
                                                            remove: tuple[str, ...]) -> None:
    with pytest.raises(CtlProtocolError):
        BundleProxy(name, "", files, remove)


def test_apply_output_names_the_identities_applied() -> None:
    assert protocol.parse_applied("applied web-8080\napplied api-9090\n") == ("web-8080", "api-9090")
    assert protocol.parse_applied("") == ()
    with pytest.raises(CtlProtocolError, match="line 2"):
        protocol.parse_applied("applied web-8080\nrefused api-9090\n")


# --- state ---

SHA_A, SHA_B = "a" * 64, "b" * 64
STATE = f"""identity web-8080 vm
file web-8080 xds/cds.yaml {SHA_A}
file web-8080 xds/eds.upstream-api.yaml {SHA_B}
file web-8080 envoy.yaml {SHA_B}
cert web-8080 7a3f 1796555333 1796559233
identity api-api-v2-1 container
cert api-api-v2-1 none
identity checker checker
cert checker 1 0 60
end
"""


def test_state_parses_into_identities_files_and_certificates() -> None:
    state = protocol.parse_state(STATE)
    assert state.identities == {"web-8080": "vm", "api-api-v2-1": "container", "checker": "checker"}
    assert state.files == {"web-8080": {"xds/cds.yaml": SHA_A, "xds/eds.upstream-api.yaml": SHA_B,
                                        "envoy.yaml": SHA_B}, "api-api-v2-1": {}, "checker": {}}
    assert state.certs == {
        "web-8080": CertState("7a3f", datetime(2026, 12, 6, 11, 8, 53, tzinfo=UTC),
                              datetime(2026, 12, 6, 12, 13, 53, tzinfo=UTC)),
        "api-api-v2-1": None,
        "checker": CertState("1", datetime(1970, 1, 1, tzinfo=UTC), datetime(1970, 1, 1, 0, 1, tzinfo=UTC))}
    assert state.resource_version("web-8080") == protocol.resource_version(
        {"xds/cds.yaml": SHA_A, "xds/eds.upstream-api.yaml": SHA_B})
    assert state.resource_version("checker") == protocol.resource_version({})


@pytest.mark.parametrize(("text", "message"), [
    (STATE.replace("end\n", ""), "without `end`"),
    (STATE + "identity late vm\n", "line 11: after `end`"),
    ("file web-8080 xds/cds.yaml " + SHA_A + "\nend\n", "line 1: names an identity not listed before"),
    (STATE.replace("identity checker checker", "identity checker root"), "line 8: expected `identity"),
    (STATE.replace("identity api-api-v2-1 container", "identity web-8080 vm"), "line 6: identity listed twice"),
    (STATE.replace("xds/cds.yaml", "xds/../x.yaml"), "line 2: expected `file"),
    (STATE.replace("xds/cds.yaml", "tls/key.pem"), "line 2: expected `file"),
    (STATE.replace(SHA_A, SHA_A[:-1]), "line 2: expected `file"),
    (STATE.replace("envoy.yaml", "xds/cds.yaml"), "line 4: file listed twice"),
    (STATE.replace("7a3f", "7A3F"), "line 5: expected `cert"),
    (STATE.replace("1796559233", "soon"), "line 5: expected `cert"),
    (STATE.replace("cert checker 1 0 60\n", ""), "no `cert` line for checker"),
    (STATE.replace("cert checker 1 0 60\n", "cert checker none\ncert checker none\n"), "certificate listed twice"),
    (STATE.replace("identity web-8080 vm", "identity web-8080  vm"), "line 1"),
    (STATE.replace("identity web-8080 vm", "Identity web-8080 vm"), "line 1: not a record"),
    (STATE + "\n", "line 11"),
])
def test_state_output_that_is_not_whole_and_well_formed_is_refused_naming_the_line(text: str, message: str) -> None:
    with pytest.raises(CtlProtocolError, match=message.replace("(", r"\(")):
        protocol.parse_state(text)


def test_the_resource_version_covers_the_xds_files_only_in_any_order() -> None:
    shas = {"xds/lds.yaml": SHA_A, "xds/cds.yaml": SHA_B}
    version = protocol.resource_version(shas)
    assert len(version) == 16 and int(version, 16) >= 0
    assert version == hashlib.sha256(f"xds/cds.yaml {SHA_B}\nxds/lds.yaml {SHA_A}\n".encode()).hexdigest()[:16]
    assert protocol.resource_version({"envoy.yaml": SHA_A, **dict(reversed(shas.items()))}) == version
    assert protocol.resource_version({**shas, "xds/lds.yaml": SHA_B}) != version
    assert protocol.resource_version({**shas, "xds/eds.new.yaml": SHA_B}) != version
    contents: dict[str, str | bytes] = {"xds/lds.yaml": "listeners", "xds/cds.yaml": b"clusters"}
    assert protocol.resource_version_of(contents) == protocol.resource_version(
        {"xds/lds.yaml": hashlib.sha256(b"listeners").hexdigest(),
         "xds/cds.yaml": hashlib.sha256(b"clusters").hexdigest()})
    assert protocol.relpath_in(HOME, f"{HOME}/xds/lds.yaml") == "xds/lds.yaml"
    with pytest.raises(CtlProtocolError):
        protocol.relpath_in(HOME, "/etc/mesh/proxies/web-80800/xds/lds.yaml")


# --- csr and install ---

CSR = "-----BEGIN CERTIFICATE REQUEST-----\nMIIBAzCBqgIBADAOMQwwCgYDVQQDDAN3ZWI=\n-----END CERTIFICATE REQUEST-----\n"


def test_csr_output_gives_the_pending_version_and_the_request() -> None:
    assert protocol.parse_pending(f"pending 20261206T111406-1b4b81\n{CSR}") == ("20261206T111406-1b4b81",
                                                                                CSR.encode())
    for bad in ("", f"pending 2026\n{CSR}", "pending 20261206T111406-1b4b81\n",
                f"pending 20261206T111406-1b4b81\n{CSR}extra\n", f"installed 20261206T111406-1b4b81\n{CSR}"):
        with pytest.raises(CtlProtocolError):
            protocol.parse_pending(bad)


def test_install_output_gives_the_serial_as_mesh_pki_writes_it() -> None:
    assert protocol.parse_installed("installed web-8080 7a3f\n", "web-8080") == "7a3f"
    assert protocol.parse_installed("installed web-8080 7a3f\n") == "7a3f"
    for bad in ("", "installed web-8080\n", "installed api-9090 7a3f\n", "installed web-8080 7a3f\nmore\n",
                "installed web-8080 07A3F\n"):
        with pytest.raises(CtlProtocolError):
            protocol.parse_installed(bad, "web-8080")
    assert protocol.serial_hex(0x07A3F) == "7a3f"


# --- xds proxies: delivery and restart ---

def test_state_reports_which_bootstrap_each_xds_proxy_started_with() -> None:
    text = STATE.replace("identity api-api-v2-1 container\n",
                         "delivery web-8080 xds\nidentity api-api-v2-1 container\ndelivery api-api-v2-1 files\n")
    state = protocol.parse_state(text)
    assert state.delivery == {"web-8080": "xds", "api-api-v2-1": "files"}
    assert protocol.parse_state(STATE).delivery == {}  # files proxies say nothing


@pytest.mark.parametrize(("line", "message"), [
    ("delivery web-8080 ads\n", "line 6: expected `delivery NAME xds|files`"),
    ("delivery web-8080\n", "line 6: expected `delivery NAME xds|files`"),
    ("delivery web-8080 xds files\n", "line 6: expected `delivery NAME xds|files`"),
    ("delivery ghost xds\n", "line 6: names an identity not listed before"),
    ("delivery web-8080 xds\ndelivery web-8080 files\n", "line 7: delivery listed twice"),
])
def test_a_delivery_line_that_is_not_well_formed_is_refused_naming_the_line(line: str, message: str) -> None:
    with pytest.raises(CtlProtocolError, match=message.replace("(", r"\(").replace("|", r"\|")):
        protocol.parse_state(STATE.replace("identity api-api-v2-1 container\n",
                                           line + "identity api-api-v2-1 container\n"))


def test_restart_is_a_verb_of_one_identity_name() -> None:
    assert protocol.command("restart", "web-8080") == "restart web-8080"
    for args in ((), ("web-8080", "now"), ("$(reboot)",), ("../web",)):
        with pytest.raises(CtlProtocolError):
            protocol.command("restart", *args)
    protocol.parse_restarted("restarted web-8080\n", "web-8080")
    for bad in ("", "restarted api-9090\n", "restarted web-8080\nmore\n", "applied web-8080\n"):
        with pytest.raises(CtlProtocolError, match="expected `restarted web-8080`"):
            protocol.parse_restarted(bad, "web-8080")
