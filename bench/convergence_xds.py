"""bench/convergence's xDS part (`--delivery xds --parts fanout`): a Consul change to every simulated proxy having
ACKed it over ADS, for N simulated proxies (bench/xds_clients.py, one process) of a fleet served by mesh's real
ADS server in a process of its own (bench/xds_fleet.py: the controller's snapshot, XdsFeed and XdsServer).

Steps: a mesh CA for the run (mesh.pki, in a temp folder), a leaf per simulated proxy (DNS SAN = its node id, URI
SAN = spiffe://<td>/web) and the server's (DNS SAN controller.<td>, URI SAN the controllers' SPIFFE ID); the server
process builds the fleet and listens on a free loopback port; the generator connects every proxy and waits until
each has ACKed every type it subscribed at the server's versions; then K changes, one at a time: the server
process reads `change K` (t0), builds the snapshot, offers it to the feed (resources, XdsServer.update) and
answers; the bench waits until every proxy ACKed the new EDS version. Per change: the time from t0 to each
proxy's ACK (p50, p99, max over proxies), from the update to the last ACK, and the server's CPU. The server's RSS
before the fleet, with the fleet's resources built, and with every proxy connected; the generator's own CPU.

It owns the xDS run and its report; the ADS client is bench/xds_clients.py, the server process bench/xds_fleet.py.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from convergence_fanout import log, percentile
from xds_clients import ENDPOINT_TYPE, LISTENER_TYPE, SHORT, ClientIdentity, Generator, SimulatedProxy
from xds_fleet import SERVICE, node_id

REPO = Path(__file__).resolve().parents[1]
TRUST_DOMAIN = "bench.mesh"
CLK_TCK = os.sysconf("SC_CLK_TCK")
GOAL_P99_S = 1.0
GOAL_MB_PER_PROXY = 0.5


# ---- certificates -----------------------------------------------------------------------------------------------

def make_certs(folder: Path, nodes: list[str], trust_domain: str = TRUST_DOMAIN) -> tuple[bytes, list[ClientIdentity]]:
    """A mesh CA in folder/state; bundle.pem, server.pem and server-key.pem (0600) in folder; a leaf per node.
    The root bundle (PEM) and the clients' identities."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from mesh.inventory.model import controller_spiffe_id
    from mesh.pki import CertificateAuthority
    from mesh.pki.certs import Issuer

    authority, _ = CertificateAuthority.ensure(str(folder / "state"), trust_domain)
    issuer = Issuer(authority.intermediate, authority.signing.key)
    chain_tail = authority.intermediate.public_bytes(serialization.Encoding.PEM)
    bundle = authority.bundle_pem
    (folder / "bundle.pem").write_bytes(bundle)

    def leaf(name: str, dns: str, uri: str) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)]))
                .issuer_name(issuer.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                      x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns), x509.UniformResourceIdentifier(uri)]),
                               critical=False)
                .sign(issuer.key, _sha256()))
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cert.public_bytes(serialization.Encoding.PEM) + chain_tail, key_pem

    server_chain, server_key = leaf("controller", f"controller.{trust_domain}", controller_spiffe_id(trust_domain))
    (folder / "server.pem").write_bytes(server_chain)
    key_file = folder / "server-key.pem"
    key_file.touch(mode=0o600)
    key_file.write_bytes(server_key)
    identities = [ClientIdentity(node, *leaf(node, node, f"spiffe://{trust_domain}/{SERVICE}")) for node in nodes]
    return bundle, identities


def _sha256() -> Any:
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


# ---- the server process -----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def proc_usage(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) and RSS (KiB) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return {"cpu_s": (int(fields[11]) + int(fields[12])) / CLK_TCK, "rss_kb": rss}


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _tail(path: Path) -> str:
    """The server log's last lines, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-15:])
    except OSError as exc:
        return f"(no log: {exc})"


def _log_file(path: Path) -> int:
    """A file descriptor for the server process's stderr (the child gets its copy)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)


class ServerProcess:
    """bench/xds_fleet.py serve, spoken to over its stdin/stdout."""

    def __init__(self, process: asyncio.subprocess.Process, log_path: Path) -> None:
        self.process, self.log_path = process, log_path

    @classmethod
    async def start(cls, folder: Path, port: int, proxies: int, endpoints: int, tls: str) -> ServerProcess:
        log_fd = _log_file(folder / "server.log")
        try:
            process = await cls._spawn(folder, port, proxies, endpoints, tls, log_fd)
        finally:
            os.close(log_fd)
        return cls(process, folder / "server.log")

    @staticmethod
    async def _spawn(folder: Path, port: int, proxies: int, endpoints: int, tls: str,
                     log_fd: int) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, str(REPO / "bench" / "xds_fleet.py"), "serve", "--dir", str(folder), "--port", str(port),
            "--proxies", str(proxies), "--endpoints", str(endpoints), "--trust-domain", TRUST_DOMAIN,
            "--server-tls", tls, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=log_fd, limit=64 * 1024 * 1024)

    async def event(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        if not line:
            code = await self.process.wait()
            raise RuntimeError(f"the server process exited ({code}{', a crash' if code < 0 else ''}): "
                               f"{_tail(self.log_path)}")
        event: dict[str, Any] = json.loads(line)
        if event.get("event") == "error":
            raise RuntimeError(f"the server process: {event.get('message')}")
        return event

    async def command(self, line: str, timeout: float) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{line}\n".encode())
        await self.process.stdin.drain()
        return await self.event(timeout)

    def usage(self) -> dict[str, float]:
        try:
            return proc_usage(self.process.pid)
        except OSError:
            raise RuntimeError(f"the server process is gone: {_tail(self.log_path)}") from None

    async def stop(self) -> None:
        if self.process.returncode is None and self.process.stdin is not None:
            self.process.stdin.write(b"quit\n")
            self.process.stdin.close()
            try:
                await asyncio.wait_for(self.process.wait(), 20)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


# ---- the run ----------------------------------------------------------------------------------------------------

def _synced(expected: dict[str, dict[str, str]]) -> Any:
    def done(proxy: SimulatedProxy) -> bool:
        wanted = expected.get(proxy.node_id, {})
        return LISTENER_TYPE in proxy.types and all(
            proxy.acked(type_url) == version for type_url, version in wanted.items() if type_url in proxy.types)
    return done


def _acked_eds(expected: dict[str, dict[str, str]]) -> Any:
    def done(proxy: SimulatedProxy) -> bool:
        return proxy.acked(ENDPOINT_TYPE) == expected.get(proxy.node_id, {}).get(ENDPOINT_TYPE)
    return done


async def run_generator(folder: Path, clients: int, endpoints: int, changes: int, timeout: float,
                        ramp_s: float, tls: str = "mesh") -> dict[str, Any]:
    nodes = [node_id(index) for index in range(clients)]
    started = time.monotonic()
    root_pem, identities = make_certs(folder, nodes)
    log(f"xds: CA and {clients} leaves in {time.monotonic() - started:.1f} s; starting the server process")
    port = free_port()
    server = await ServerProcess.start(folder, port, clients, endpoints, tls)
    report: dict[str, Any] = {"clients": clients, "endpoints": endpoints, "changes": [], "server_tls": tls}
    generator = Generator(identities, f"127.0.0.1:{port}", root_pem, f"controller.{TRUST_DOMAIN}")
    try:
        ready = await server.event(timeout=600)
        report["server_start"] = {"before_fleet_rss_kb": ready["before_fleet"]["rss_kb"], "ready_rss_kb": ready["rss_kb"],
                                  "snapshot_s": ready["snapshot_s"], "offer_s": ready["offer_s"]}
        expected = json.loads(Path(ready["versions"]).read_text())
        log(f"xds: server ready (fleet snapshot {ready['snapshot_s']:.1f} s, resources + update "
            f"{ready['offer_s']:.1f} s, RSS {ready['rss_kb'] / 1024:.0f} MiB); connecting {clients} proxies")
        before_connect, cpu_gen = server.usage(), self_cpu()
        connect_started = time.monotonic()
        await generator.start(ramp_s)
        behind = await generator.wait_for(_synced(expected), timeout)
        connected = server.usage()
        report["connect"] = {"s": time.monotonic() - connect_started, "behind": len(behind),
                             "server_cpu_s": connected["cpu_s"] - before_connect["cpu_s"],
                             "rss_before_kb": before_connect["rss_kb"], "rss_after_kb": connected["rss_kb"],
                             "generator_cpu_s": self_cpu() - cpu_gen,
                             "types": sorted({SHORT.get(t, t) for p in generator.proxies for t in p.types})}
        if behind:
            report["connect"]["example"] = _describe(behind[0], expected)
            log(f"xds: {len(behind)} proxies not synced after {timeout:.0f} s, e.g. {report['connect']['example']}")
            return report
        log(f"xds: {clients} proxies synced in {report['connect']['s']:.1f} s; {changes} changes")
        timed_server, timed_gen = server.usage(), self_cpu()
        for number in range(1, changes + 1):
            await asyncio.sleep(0.5)
            applied = await server.command(f"change {number}", timeout=600)
            expected = json.loads(Path(applied["versions"]).read_text())
            behind = await generator.wait_for(_acked_eds(expected), timeout)
            t0, updated = applied["t0"], applied["updated"]
            acks = [p.types[ENDPOINT_TYPE].acked_at[expected[p.node_id][ENDPOINT_TYPE]] - t0
                    for p in generator.proxies if p not in behind]
            entry = {"change": number, "snapshot_s": applied["snapshot_s"], "offer_s": applied["offer_s"],
                     "acks_s": acks, "behind": len(behind), "from_update_s": (max(acks) + t0 - updated) if acks else None}
            report["changes"].append(entry)
            log(f"xds: change {number}: every ACK within {max(acks) if acks else float('nan'):.3f} s "
                f"(snapshot {applied['snapshot_s']:.2f} s, offer {applied['offer_s']:.2f} s), {len(behind)} behind")
        end_server = server.usage()
        report["timed"] = {"server_cpu_s": end_server["cpu_s"] - timed_server["cpu_s"],
                           "generator_cpu_s": self_cpu() - timed_gen, "rss_kb": end_server["rss_kb"]}
        report["nacks"] = sum(len(r.nacked) for p in generator.proxies for r in p.types.values())
        report["ended"] = sum(len(p.ends) for p in generator.proxies)
        return report
    except (RuntimeError, TimeoutError) as exc:  # the server process died or stopped answering: in the report
        report["error"] = str(exc) or type(exc).__name__
        log(f"xds: ERROR: {report['error']}")
        return report
    finally:
        await generator.stop()
        await server.stop()


def _describe(proxy: SimulatedProxy, expected: dict[str, dict[str, str]]) -> str:
    wanted = expected.get(proxy.node_id, {})
    parts = [f"{SHORT.get(t, t)} acked {r.acked[:8] or '-'} want {wanted.get(t, '?')[:8]} names {len(r.names)}"
             for t, r in proxy.types.items()]
    ends = f"streams ended {len(proxy.ends)}, last: {proxy.ends[-1]}" if proxy.ends else "stream open"
    return f"{proxy.node_id}: {ends}; responses {proxy.responses}; " + "; ".join(parts)


def run_xds(clients: int, endpoints: int, changes: int, keep: bool, timeout: float = 120.0,
            ramp_s: float = 0.0, tls: str = "mesh") -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="mesh-bench-conv-xds-"))
    log(f"xds: {clients} simulated ADS proxies, {endpoints} endpoints, {changes} changes, in {folder}")
    try:
        return asyncio.run(run_generator(folder, clients, endpoints, changes, timeout, ramp_s, tls))
    finally:
        if keep:
            log(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


# ---- the report -------------------------------------------------------------------------------------------------

def _ms(value: float) -> str:
    return f"{value * 1000:.0f} ms"


def xds_change_times(report: dict[str, Any]) -> list[float]:
    """Per change, the time from the Consul change to the last proxy's ACK."""
    return [max(c["acks_s"]) for c in report["changes"] if c["acks_s"] and not c["behind"]]


def print_xds(report: dict[str, Any], baseline: dict[str, Any] | None) -> None:
    clients = report["clients"]
    print(f"\n## xDS (ADS) convergence: {clients} simulated proxies (one process, grpc.aio, mTLS, acking like Envoy), "
          f"a service of {report['endpoints']} endpoints, {len(report['changes'])} changes (one instance drained each)"
          + ("" if report.get("server_tls", "mesh") == "mesh" else
             "; the server's TLS made STATIC (--server-tls static, a diagnostic)"))
    if "error" in report:
        print(f"  ERROR (the run stopped): {report['error']}")
    start = report.get("server_start", {})
    if start:
        print(f"  server start: fleet snapshot {start['snapshot_s']:.2f} s, resources + update {start['offer_s']:.2f} s")
    connect = report.get("connect")
    if connect is None or "timed" not in report and report["changes"]:
        return
    print(f"  connect + first sync of every proxy ({', '.join(connect['types'])}): {connect['s']:.2f} s, "
          f"{connect['behind']} not synced; server CPU {connect['server_cpu_s']:.2f} s, generator CPU "
          f"{connect['generator_cpu_s']:.2f} s")
    if not report["changes"]:
        print(f"  no change measured: {connect.get('example', '')}")
        return
    every = [ack for change in report["changes"] for ack in change["acks_s"]]
    last = xds_change_times(report)
    print(f"  Consul change to a proxy's ACK (all proxies, all changes): p50 {_ms(percentile(every, 0.5))}  "
          f"p99 {_ms(percentile(every, 0.99))}  max {_ms(max(every))}")
    if last:
        print(f"  Consul change to the LAST proxy's ACK, per change: p50 {_ms(percentile(last, 0.5))}  "
              f"p99 {_ms(percentile(last, 0.99))}  max {_ms(max(last))}")
    snapshot = [c["snapshot_s"] for c in report["changes"]]
    offer = [c["offer_s"] for c in report["changes"]]
    pushed = [c["from_update_s"] for c in report["changes"] if c["from_update_s"] is not None]
    print(f"  of which, medians: snapshot (build_snapshot) {_ms(statistics.median(snapshot))}, feed offer "
          f"(ads_resources + update) {_ms(statistics.median(offer))}, update to the last ACK (debounce, push, ACKs) "
          f"{_ms(statistics.median(pushed)) if pushed else '-'}")
    behind = sum(c["behind"] for c in report["changes"])
    print(f"  proxies behind at a change's timeout: {behind}; NACKs: {report['nacks']}; streams ended: "
          f"{report['ended']} (each reconnects after a backoff)")
    timed = report["timed"]
    changes = len(report["changes"])
    print(f"  server CPU during the changes: {timed['server_cpu_s']:.2f} s ({timed['server_cpu_s'] / changes:.2f} s a "
          f"change); the generator's own CPU (reported apart, same machine, {os.cpu_count()} CPUs): "
          f"{timed['generator_cpu_s']:.2f} s ({timed['generator_cpu_s'] / changes:.2f} s a change)")
    before_fleet, ready = start["before_fleet_rss_kb"], start["ready_rss_kb"]
    connected = connect["rss_after_kb"]
    per_proxy = (connected - before_fleet) / 1024 / clients
    streams = (connected - connect["rss_before_kb"]) / 1024 / clients
    print(f"  server RSS: {before_fleet / 1024:.0f} MiB before the fleet, {ready / 1024:.0f} MiB with its snapshot and "
          f"resources, {connected / 1024:.0f} MiB with every proxy connected, {timed['rss_kb'] / 1024:.0f} MiB at the "
          f"end; per proxy: {per_proxy:.3f} MiB (fleet + stream), of which the stream {streams:.3f} MiB")
    if last:
        print(f"  goal p99 < {GOAL_P99_S:.0f} s for {clients} proxies (change to the last ACK): "
              f"{'pass' if percentile(last, 0.99) < GOAL_P99_S else 'miss'}; goal < {GOAL_MB_PER_PROXY} MB per proxy: "
              f"{'pass' if per_proxy * 1.048576 < GOAL_MB_PER_PROXY else 'miss'}")
    if baseline is not None and last:
        rounds = [a + b for a, b in zip(baseline["snapshots_s"], baseline["rounds_s"], strict=True)]
        print(f"  baseline: the files transport (push fan-out over SSH, {baseline['host_script']} host script) to "
              f"{baseline['hosts']} hosts, {baseline.get('endpoints', 2)} endpoints: snapshot + round p50 "
              f"{_ms(percentile(rounds, 0.5))}  p99 {_ms(percentile(rounds, 0.99))}")
        pushes = [c["offer_s"] + c["from_update_s"] for c in report["changes"] if c["from_update_s"] is not None]
        if pushes:
            files_rounds = baseline["rounds_s"]
            print(f"  transport alone (after the snapshot): xds feed offer + push to the last ACK p50 "
                  f"{_ms(percentile(pushes, 0.5))}  p99 {_ms(percentile(pushes, 0.99))}; files push round p50 "
                  f"{_ms(percentile(files_rounds, 0.5))}  p99 {_ms(percentile(files_rounds, 0.99))}; ratio xds/files "
                  f"p50 {percentile(pushes, 0.5) / percentile(files_rounds, 0.5):.2f}x  "
                  f"p99 {percentile(pushes, 0.99) / percentile(files_rounds, 0.99):.2f}x")
        print(f"  ratio xds/files (change to the last proxy): p50 {percentile(last, 0.5) / percentile(rounds, 0.5):.2f}x"
              f"  p99 {percentile(last, 0.99) / percentile(rounds, 0.99):.2f}x"
              + ("" if baseline["hosts"] == clients else f"  (NOT the same fleet size: {baseline['hosts']} hosts "
                 f"against {clients} proxies)"))
