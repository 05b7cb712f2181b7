"""`python -m mesh.healthcheck --config /etc/mesh/checker/checker.json`: wiring, signals and exit codes.

It builds the parts from the config and runs the loop until SIGTERM/SIGINT; it must not decide health itself.
"""

from __future__ import annotations

import argparse
import signal
import ssl
import sys
import threading
from functools import partial
from types import FrameType
from typing import NoReturn

import structlog

from mesh.catalog import ConsulAccess, read_token
from mesh.errors import EXIT_ERROR, EXIT_OK, EXIT_USAGE, MeshError, UsageError
from mesh.healthcheck.checker import HealthChecker, consul_writer
from mesh.healthcheck.config import DEFAULT_CONFIG, CheckerConfig, CheckerConfigError, Instance, load_config
from mesh.healthcheck.identity import ClientIdentity
from mesh.healthcheck.leader import Leadership
from mesh.healthcheck.probe import ProbeResult, client_context, probe
from mesh.log import configure_logging


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # exit 5 for usage, as every mesh command does
        raise UsageError(message)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m mesh.healthcheck", description=__doc__)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="checker.json (default: %(default)s)")
    parser.add_argument("--log-format", choices=("console", "json"), default=None)
    parser.add_argument("--probe", metavar="SERVICE@ADDRESS:PORT", default=None,
                        help="probe one instance once with the checker's identity, print the result and exit "
                             "(0 passing, 1 critical): the deploy's health gate")
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(f"mesh health checker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(args.log_format)
    log = structlog.get_logger()
    if args.probe:
        return probe_once(args.config, args.probe)
    try:
        config = load_config(args.config)
        checker = build_checker(config)
    except MeshError as exc:
        log.error("checker_config_refused", error=str(exc))
        return exc.exit_code
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, partial(_request_stop, stop))
    checker.run(stop)
    return EXIT_OK


PROBE_UNKNOWN = 3  # --probe's exit when the checker itself cannot probe (its files are missing): no verdict


def probe_once(config_path: str, target: str) -> int:
    """One probe of SERVICE@ADDRESS:PORT with the checker's certificate; prints `passing|critical: output`; exit
    0 passing, 1 critical, 3 (PROBE_UNKNOWN) when the checker cannot probe at all."""
    service, _, where = target.partition("@")
    address, _, port = where.rpartition(":")
    if not service or not address or not port.isdigit():
        print(f"mesh health checker: --probe expects SERVICE@ADDRESS:PORT, got {target!r}", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load_config(config_path)
        context = client_context(config.cert, config.key, config.ca)
    except (MeshError, OSError) as exc:  # the checker's own files: no verdict on the instance
        print(f"unknown: the checker cannot probe: {exc}")
        return PROBE_UNKNOWN
    result = probe(context, Instance(id="gate", service=service, host="", address=address.strip("[]"),
                                     proxy_port=int(port)), config)
    print(f"{result.status}: {result.output}")
    return 0 if result.status == "passing" else 1


def build_checker(config: CheckerConfig) -> HealthChecker:
    """The checker with its real parts: the client TLS identity (reloaded before a round when its `tls` link
    changed), the Consul lock and the Consul writer."""
    try:
        identity = ClientIdentity(config.cert, config.key, config.ca)
    except (OSError, ssl.SSLError) as exc:  # the message names files, never their content
        raise CheckerConfigError(f"cannot load the checker's certificate, key or CA "
                                 f"({config.cert}, {config.key}, {config.ca}): {exc}") from exc
    access = consul_access(config)
    lock = Leadership(access, config.lock_key, config.session_ttl)

    def prober(instance: Instance) -> ProbeResult:
        return probe(identity.context, instance, config)

    return HealthChecker(config, lock, prober, consul_writer(access), before_round=identity.refresh)


def consul_access(config: CheckerConfig) -> ConsulAccess:
    """Consul's URL, the token read from its 0600 file (an unreadable file is refused, naming only the file)
    and the CA bundle for https."""
    token = read_token(config.consul_token_file) if config.consul_token_file else None
    return ConsulAccess(config.consul_url, token, config.consul_ca)


def _request_stop(stop: threading.Event, signum: int, frame: FrameType | None) -> None:
    stop.set()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(EXIT_ERROR)
