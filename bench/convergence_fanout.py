"""bench/convergence's fan-out part: the controller's pusher (mesh.controller.pusher) pushing endpoint changes to N
simulated hosts, each an sshd of its own in a network namespace of the bench's own.

Layout (all under one temp folder, removed at the end, with the namespace and every sshd started here):
- namespace `mesh-bench-conv-<pid>` with its loopback up; host i is sshd listening on 127.1.<i/250>.<i%250+1>:22
  (its own host key, its own config: `AuthorizedKeysFile` is the host's own file, `StrictModes no` because the
  files live under /tmp, `PermitRootLogin forced-commands-only`), in a mount namespace of its own where a copy
  of /etc/passwd giving root the shell /bin/sh is bind-mounted (sshd runs the forced command through the login
  shell; this machine's root has bash, whose ~/.bashrc sshd makes it read: 100+ ms of pyenv per call, a cost no
  host's mesh-ctl account has);
- each authorized_keys holds the bench controller's key as
  `restrict,command="MESH_CTL_ROOT=<root> sh <repo>/templates/host/mesh-ctl.sh \"$SSH_ORIGINAL_COMMAND\"" ...`
  so every call runs mesh's real host script, writing under that host's own root;
- each root holds what a deploy leaves for mesh-ctl: `etc/mesh/ctl/identities` (one proxy, owner root), the
  proxy folder `etc/mesh/proxies/<proxy>/` with envoy.yaml, ca.pem and xds/ (the files mesh renders for `web` of
  mesh.testing.loopback's two-service mesh), and `usr/local/lib/mesh/envoy`: a STUB that accepts every config
  (`exit 0`): the host's own validation runs on each real host's CPU in parallel, here all hosts would share
  this machine's, so the bench measures the controller and the transport, not N Envoys starting. No Envoy runs
  (no admin socket), so mesh-ctl moves files without waiting for a reload.

The controller side runs in a worker process inside the namespace (`python convergence_fanout.py worker ...`):
one Pusher over SshTransport (paramiko, host keys checked), the real validation of each distinct file set by
this machine's Envoy (once per round: every host has the same proxy), and a round per endpoint change (api's
endpoints alternate between two sets). Round 0 connects and runs `state` on every host (reported apart); the
timed rounds push one changed EDS file to every host. The worker reports each round's wall time and its own
CPU (user+sys) and memory (RSS, peak RSS); the sshd's CPU (the hosts' side, all on this machine) is read from
/proc for the listeners and the sessions they reaped.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "templates" / "host" / "mesh-ctl.sh"
SSHD = "/usr/sbin/sshd"
STUB_ENVOY = "#!/bin/sh\n# bench/convergence: a host's Envoy validation stand-in (accepts every config)\nexit 0\n"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (p99 of 20 values is the largest)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-fraction * len(ordered) // 1))))
    return ordered[rank - 1]


# ---- the simulated hosts --------------------------------------------------------------------------------------

@dataclass
class Fleet:
    scratch: Path
    netns: str
    sshd: list[subprocess.Popen[bytes]]
    spec_path: Path
    key: Path
    roots: list[Path]
    created_run_sshd: bool


def _address(index: int) -> str:
    return f"127.1.{index // 250}.{index % 250 + 1}"


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kwargs)


def ensure_sshd() -> None:
    if Path(SSHD).exists():
        return
    if os.geteuid() != 0:
        raise SystemExit(f"{SSHD} missing: apt-get install openssh-server")
    log("installing openssh-server (for the simulated hosts' sshd; policy-rc.d keeps the service from starting)")
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "openssh-server"], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def proxy_files(state_dir: Path) -> tuple[Any, bytes, dict[str, Any]]:
    """web's files as mesh renders them (mesh.testing.loopback's two-service mesh), its proxy folder at the usual
    /etc/mesh/proxies/<proxy>; the CA's root (for the controller's validation); eds path -> upstream service."""
    from mesh.config import compute_proxy_config, paths
    from mesh.controller.spec import EndpointSource
    from mesh.pki import CertificateAuthority
    from mesh.render import render_proxy_files
    from mesh.testing.loopback import two_service_mesh

    loop = two_service_mesh(api_app_port=9090, trust_domain="bench.mesh")
    config = compute_proxy_config(loop.mesh, loop.web)  # its folder: paths.proxy_dir (/etc/mesh/proxies/...)
    files = render_proxy_files(config)
    authority, _ = CertificateAuthority.ensure(str(state_dir), "bench.mesh")
    xds = f"{files.proxy_dir}/{paths.XDS_DIR_NAME}"
    endpoints = {f"{xds}/eds.{listener.cluster}.yaml": EndpointSource(listener.service)
                 for listener in config.outbound}
    return files, authority.root_pem, endpoints


def start_fleet(hosts: int, scratch: Path, host_script: str) -> Fleet:
    from mesh.controller.spec import ControllerSpec, HostSpec, IdentitySpec, ProxySpec, SpecFile

    netns = f"mesh-bench-conv-{os.getpid()}"
    key = scratch / "controller_id_ed25519"
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mesh-controller@bench", "-f", str(key)])
    public = (scratch / "controller_id_ed25519.pub").read_text().strip()
    files, root_pem, endpoints = proxy_files(scratch / "state")
    (scratch / "ca.pem").write_bytes(root_pem)
    (scratch / "passwd").write_text(_passwd_with_sh())
    created_run_sshd = not Path("/run/sshd").exists()
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    _run(["ip", "netns", "add", netns])
    fleet = Fleet(scratch, netns, [], scratch / "spec.json", key, [], created_run_sshd)
    try:
        _run(["ip", "-n", netns, "link", "set", "lo", "up"])
        specs = []
        for index in range(hosts):
            root = scratch / f"h{index:04d}"
            fleet.roots.append(root)
            host_key_lines = _lay_out_host(root, index, files, root_pem, public, host_script)
            proxy = ProxySpec(files.proxy, "web", files.proxy_dir, files.bootstrap_sha256,
                              tuple(SpecFile(f.path, f.kind, f.content) for f in files.files), endpoints)
            specs.append(HostSpec(f"h{index:04d}", _address(index), 22, host_key_lines,
                                  (IdentitySpec(files.proxy, "vm", "spiffe://bench.mesh/web"),), (proxy,), user="root"))
            sshd = (f"mount --bind {scratch}/passwd /etc/passwd && "
                    f"exec {SSHD} -D -e -f {root}/sshd_config")
            with open(root / "sshd.log", "wb") as sshd_log:
                fleet.sshd.append(subprocess.Popen(
                    ["ip", "netns", "exec", netns, "unshare", "--mount", "sh", "-c", sshd],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=sshd_log))
        spec = ControllerSpec(mesh_id="bench", trust_domain="bench.mesh", plan_digest="bench",
                              consul_url="http://127.0.0.1:1", consul_token_file=None, consul_ca_file=None,
                              cert_ttl_s=86400, hosts=tuple(specs))
        fleet.spec_path.write_text(spec.to_json())
        _wait_listening(fleet, hosts)
    except BaseException:
        stop_fleet(fleet, keep=False)
        raise
    return fleet


def _passwd_with_sh() -> str:
    """/etc/passwd with root's login shell /bin/sh: sshd runs the forced command through the user's shell, and
    bash run by sshd reads ~/.bashrc (here pyenv's init: 100+ ms a call) where a host's mesh-ctl account has
    /bin/sh. Bind-mounted over /etc/passwd in each sshd's own mount namespace only."""
    lines = []
    for line in Path("/etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == "root" and len(fields) == 7:
            fields[6] = "/bin/sh"
        lines.append(":".join(fields))
    return "\n".join(lines) + "\n"


def _lay_out_host(root: Path, index: int, files: Any, root_pem: bytes, controller_public: str,
                  host_script: str) -> tuple[str, ...]:
    """One host's root as a deploy leaves it for mesh-ctl, its sshd config and host key; its known_hosts line.
    host_script `null`: `apply` only reads the bundle and answers `applied NAME` (the rest is mesh-ctl.sh)."""
    home = root / files.proxy_dir.lstrip("/")
    (home / "xds").mkdir(parents=True)
    for file in files.files:
        target = root / file.path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(file.content)
    (home / "ca.pem").write_bytes(root_pem)
    ctl = root / "etc/mesh/ctl"
    ctl.mkdir(parents=True)
    (ctl / "identities").write_text(f"{files.proxy} vm {home} root web {home}/ca.pem -\n")
    os.chmod(ctl / "identities", 0o644)
    envoy = root / "usr/local/lib/mesh/envoy"
    envoy.parent.mkdir(parents=True)
    envoy.write_text(STUB_ENVOY)
    envoy.chmod(0o755)
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "ssh_host_ed25519_key")])
    forced = f'MESH_CTL_ROOT={root} sh {SCRIPT} \\"$SSH_ORIGINAL_COMMAND\\"'
    if host_script == "null":
        (root / "null-apply.sh").write_text(
            f'case $1 in apply) cat > /dev/null; echo "applied {files.proxy}" ;;\n'
            f'*) MESH_CTL_ROOT={root} exec sh {SCRIPT} "$1" ;; esac\n')
        forced = f'sh {root}/null-apply.sh \\"$SSH_ORIGINAL_COMMAND\\"'
    (root / "authorized_keys").write_text(f'restrict,command="{forced}" {controller_public}\n')
    (root / "sshd_config").write_text("\n".join([
        f"ListenAddress {_address(index)}:22", f"HostKey {root}/ssh_host_ed25519_key",
        f"AuthorizedKeysFile {root}/authorized_keys", "StrictModes no", "PermitRootLogin forced-commands-only",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no", "PidFile none",
        "MaxStartups 1000", "MaxSessions 100", "LogLevel ERROR", "UseDNS no", ""]))
    host_key = (root / "ssh_host_ed25519_key.pub").read_text().split()
    return (f"{_address(index)} {host_key[0]} {host_key[1]}",)


def _wait_listening(fleet: Fleet, hosts: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    wanted = {f"{_address(i)}:22" for i in range(hosts)}
    while True:
        listening = _run(["ip", "netns", "exec", fleet.netns, "ss", "-Htln"]).stdout
        found = {line.split()[3] for line in listening.splitlines() if len(line.split()) > 3}
        dead = [p.pid for p in fleet.sshd if p.poll() is not None]
        if dead:
            log_text = (fleet.roots[0] / "sshd.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{len(dead)} sshd exited at start; the first host's log: {log_text}")
        if wanted <= found:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(wanted - found)} sshd not listening after {timeout:.0f} s")
        time.sleep(0.2)


def sshd_cpu_seconds(fleet: Fleet) -> float:
    """CPU of every sshd listener and of the sessions (and mesh-ctl scripts) they reaped."""
    total = 0
    for process in fleet.sshd:
        for pid in _children(process.pid) or [process.pid]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return total / CLK_TCK


def _children(pid: int) -> list[int]:
    """`ip netns exec` execs sshd in place: the Popen pid is sshd's; kept general in case it forks."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()] or [pid]
    except OSError:
        return [pid]


def stop_fleet(fleet: Fleet, keep: bool) -> None:
    for process in fleet.sshd:
        if process.poll() is None:
            process.terminate()
    for process in fleet.sshd:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    subprocess.run(["ip", "netns", "delete", fleet.netns], check=False, capture_output=True)
    if fleet.created_run_sshd:
        shutil.rmtree("/run/sshd", ignore_errors=True)
    if not keep:
        shutil.rmtree(fleet.scratch, ignore_errors=True)


# ---- the controller side (the worker, inside the namespace) ---------------------------------------------------

def endpoint_set(count: int, drained: int | None) -> Any:
    """Consul's answer for a service of `count` instances (10.9.x.y:21000), the one at index `drained` (if any) not
    up (a `mesh drain`): what one endpoint change looks like. Each with its service, instance and host, as Consul
    lists them (the lb_endpoint metadata callers' access logs read; bench/xds_fleet.py's are the same)."""
    from mesh.controller.endpoints import Endpoint, ServiceEndpoints

    registered = tuple(Endpoint(f"10.9.{index // 250}.{index % 250 + 1}", 21000, service="api",
                                instance=f"api-h{index}", host=f"a{index:04d}") for index in range(count))
    return ServiceEndpoints("api", registered, tuple(e for i, e in enumerate(registered) if i != drained))


def worker(spec_path: Path, key: Path, ca_pem: Path, rounds: int, workers: int, out: Path, endpoints: int = 2) -> None:
    from mesh.controller.endpoints import EdsRenders
    from mesh.controller.pusher import Pusher
    from mesh.controller.snapshot import Built, build_snapshot, watched_services
    from mesh.controller.spec import load_spec
    from mesh.controller.transport import SshTransport
    from mesh.render import validate_proxy_files

    spec = load_spec(str(spec_path))
    root_pem = ca_pem.read_bytes()
    validations: list[float] = []

    def validate(files: Any) -> None:
        started = time.perf_counter()
        validate_proxy_files(files, root_pem)
        validations.append(time.perf_counter() - started)

    services = watched_services(spec)
    sets = [endpoint_set(endpoints, None), endpoint_set(endpoints, 1)]
    pusher = Pusher(SshTransport(str(key)), validate, max_workers=workers)
    pusher.set_hosts(spec.hosts)
    timings, snapshots, results = [], [], []
    previous: Built | None = None  # the previous build and the EDS render memo, as the controller keeps them
    renders = EdsRenders()
    usage_before = None
    try:
        for number in range(rounds + 1):
            known = {service: replace(sets[number % 2], service=service) for service in services}
            built = time.perf_counter()
            snapshot = build_snapshot(spec, known, previous=previous, renders=renders)  # as the daemon does
            previous = Built(snapshot, spec, known, None, None)
            snapshots.append(time.perf_counter() - built)
            if number == 1:
                usage_before = (resource.getrusage(resource.RUSAGE_SELF), time.perf_counter())
            started = time.perf_counter()
            result = pusher.round(snapshot, lambda: True)
            timings.append(time.perf_counter() - started)
            results.append({"pushed": result.pushed, "refused": result.refused, "errors": result.errors,
                            "behind": len(result.behind)})
        assert usage_before is not None
        usage = resource.getrusage(resource.RUSAGE_SELF)
        wall = time.perf_counter() - usage_before[1]
        cpu = (usage.ru_utime - usage_before[0].ru_utime) + (usage.ru_stime - usage_before[0].ru_stime)
    finally:
        pusher.close()
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    out.write_text(json.dumps({
        "connect_round_s": timings[0], "rounds_s": timings[1:], "snapshots_s": snapshots[1:], "results": results,
        "cpu_s": cpu, "wall_s": wall, "rss_kb": int(status["VmRSS"].split()[0]),
        "peak_rss_kb": int(status["VmHWM"].split()[0]), "threads": workers,
        "validation_s": validations, "validation_cpu_s": children.ru_utime + children.ru_stime}))


# ---- the driver -------------------------------------------------------------------------------------------------

def fanout(hosts: int, rounds: int, workers: int, keep: bool, host_script: str = "real",
           endpoints: int = 2) -> dict[str, Any]:
    """Start the fleet, run the worker in its namespace, check every host got the last round's file, tear down."""
    if os.geteuid() != 0:
        raise SystemExit("the fan-out bench runs as root (a network namespace, sshd)")
    ensure_sshd()
    scratch = Path(tempfile.mkdtemp(prefix="mesh-bench-conv-"))
    os.chmod(scratch, 0o755)
    log(f"fan-out: {hosts} simulated hosts (sshd + {host_script} host script under their own root) in {scratch}")
    started = time.monotonic()
    fleet = start_fleet(hosts, scratch, host_script)
    try:
        log(f"fan-out: {hosts} sshd listening after {time.monotonic() - started:.1f} s; pushing {rounds} rounds")
        cpu_before = sshd_cpu_seconds(fleet)
        out = scratch / "worker.json"
        argv = ["ip", "netns", "exec", fleet.netns, sys.executable, str(Path(__file__).resolve()), "worker",
                "--spec", str(fleet.spec_path), "--key", str(fleet.key), "--ca", str(scratch / "ca.pem"),
                "--rounds", str(rounds), "--workers", str(workers), "--out", str(out),
                "--endpoints", str(endpoints)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"the worker failed ({done.returncode}): {' '.join(map(shlex.quote, argv))}\n"
                               f"{done.stderr[-4000:]}")
        report = json.loads(out.read_text())
        time.sleep(1.0)  # the sessions the worker closed are reaped by their listener (their CPU counted there)
        report["hosts_cpu_s"] = sshd_cpu_seconds(fleet) - cpu_before
        report["hosts"] = hosts
        report["host_script"] = host_script
        report["endpoints"] = endpoints
        report["check"] = (_check_hosts(fleet, rounds, endpoints) if host_script == "real"
                           else "not checked (the null script writes nothing)")
        return report
    finally:
        stop_fleet(fleet, keep)
        if keep:
            log(f"kept {scratch}")


def _check_hosts(fleet: Fleet, rounds: int, endpoints: int) -> str:
    """Every host's endpoint file holds the last round's endpoints (one drained after an odd round count)."""
    wanted = endpoints - 1 if rounds % 2 else endpoints
    wrong = []
    for root in fleet.roots:
        found = list(root.glob("etc/mesh/proxies/*/xds/eds.upstream-*.yaml"))
        text = found[0].read_text() if found else ""
        if text.count("port_value: 21000") != wanted or "10.9.0.1" not in text:
            wrong.append(root.name)
    return "every host has the last round's endpoints" if not wrong else f"WRONG on {len(wrong)}: {wrong[:5]}"


def print_fanout(report: dict[str, Any]) -> None:
    rounds = report["rounds_s"]
    bad = [r for r in report["results"][1:] if r["errors"] or r["refused"] or r["pushed"] != report["hosts"]]
    wall = report["wall_s"]
    what = ("mesh-ctl.sh apply (stub Envoy)" if report["host_script"] == "real"
            else "a null apply (reads the bundle, answers applied)")
    print(f"\n## push fan-out: {report['hosts']} simulated hosts running {what}, {len(rounds)} rounds (one changed "
          f"EDS file of {report.get('endpoints', 2)} endpoints per host per round), {report['threads']} push threads")
    print(f"  connect + state + first push (round 0): {report['connect_round_s']:.3f} s")
    print(f"  per round: p50 {percentile(rounds, 0.5):.3f} s  p99 {percentile(rounds, 0.99):.3f} s  "
          f"min {min(rounds):.3f} s  max {max(rounds):.3f} s  mean {statistics.mean(rounds):.3f} s")
    snapshots = report["snapshots_s"]
    total = [a + b for a, b in zip(snapshots, rounds, strict=True)]
    print(f"  the snapshot built before each round (every proxy's files with the new endpoints): p50 "
          f"{percentile(snapshots, 0.5):.3f} s; snapshot + round: p50 {percentile(total, 0.5):.3f} s  "
          f"p99 {percentile(total, 0.99):.3f} s")
    print(f"  controller CPU during the timed rounds: {report['cpu_s']:.2f} s of {wall:.2f} s wall "
          f"({100 * report['cpu_s'] / wall:.0f}% of one CPU), {report['cpu_s'] / len(rounds) * 1000:.0f} ms/round; "
          f"RSS {report['rss_kb'] / 1024:.0f} MiB (peak {report['peak_rss_kb'] / 1024:.0f} MiB)")
    validations = report["validation_s"]
    if validations:
        print(f"  controller-side Envoy validations: {len(validations)} (one per distinct file set), median "
              f"{statistics.median(validations):.3f} s, their CPU {report['validation_cpu_s']:.2f} s")
    print(f"  the simulated hosts' CPU (sshd sessions, mesh-ctl.sh, tar, sha256sum; same machine, "
          f"{os.cpu_count()} CPUs): {report['hosts_cpu_s']:.1f} s, {report['hosts_cpu_s'] / max(1, len(rounds)):.2f}"
          " s/round")
    print(f"  rounds with a host not pushed, refused or failed: {len(bad)}{'' if not bad else ' ' + str(bad[:3])}")
    print(f"  after the last round: {report['check']}")
    goal = percentile(total, 0.99) < 1.0
    print(f"  goal p99 < 1 s for {report['hosts']} hosts: {'pass' if goal else 'miss'}")


def main_worker(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--endpoints", type=int, default=2)
    args = parser.parse_args(argv)
    worker(args.spec, args.key, args.ca, args.rounds, args.workers, args.out, args.endpoints)


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        sys.path.insert(0, str(REPO))
        main_worker(sys.argv[2:])
    else:
        raise SystemExit("run bench/convergence (this module is its fan-out part and worker)")
