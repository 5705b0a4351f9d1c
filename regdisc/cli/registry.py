"""The verbs that talk to a registry: discovery, registration and instance upkeep.

Each runs the reactor for one request with `RegistryClient` (or, with
``register --keep-alive``, until Ctrl-C). Exit status: 0 done, 1 the registry
answered an error, 2 usage, 3 the registry could not be reached (connection,
time-out or TLS).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable

from twisted.internet.defer import Deferred
from twisted.internet.task import react

from ..client import (
    ClientTLS,
    ClientTLSError,
    RegistryClient,
    RegistryError,
    RegistryUnavailable,
    TLSRefused,
)
from ..model import STATUSES, rfc3339
from . import output
from .output import fail

DEFAULT_URL = "https://localhost:8443"

Verb = Callable[[RegistryClient, argparse.Namespace, Any], Awaitable[str]]


def add_registry_verbs(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the verbs that talk to a registry, each with the connection options."""
    services = _verb(subparsers, "services", "list services with live instances", _services)
    del services

    instances = _verb(subparsers, "instances", "list the live instances of a service", _instances)
    instances.add_argument("service", metavar="SERVICE")
    instances.add_argument("--status", choices=STATUSES, help="only instances with this status")
    instances.add_argument("--tag", dest="tags", action="append", default=[], metavar="T",
                           help="only instances with this tag; repeatable, all must match")
    instances.add_argument("--meta", dest="metadata", action="append", default=[], type=_pair,
                           metavar="K=V", help="only instances with this metadata; repeatable")

    instance = _verb(subparsers, "instance", "show one instance", _instance)
    instance.add_argument("service", metavar="SERVICE")
    instance.add_argument("instance_id", metavar="ID")

    register = _verb(subparsers, "register", "register an instance; print its id and token",
                     _register)
    register.add_argument("service", metavar="SERVICE")
    register.add_argument("--host", required=True, metavar="H", help="host name or IP address")
    register.add_argument("--port", required=True, type=int, metavar="P")
    register.add_argument("--id", dest="instance_id", metavar="ID",
                          help="instance id (default: the registry picks one)")
    register.add_argument("--ttl", type=int, metavar="SECONDS", help="lease TTL")
    register.add_argument("--status", choices=STATUSES)
    register.add_argument("--tag", dest="tags", action="append", default=None, metavar="T",
                          help="repeatable")
    register.add_argument("--meta", dest="metadata", action="append", default=None, type=_pair,
                          metavar="K=V", help="repeatable")
    register.add_argument("--keep-alive", action="store_true",
                          help="keep the instance registered until Ctrl-C, then deregister")

    for name, about, handler in (
        ("heartbeat", "renew an instance's lease", _heartbeat),
        ("rotate", "replace an instance's token; print the new one", _rotate),
        ("deregister", "remove an instance", _deregister),
    ):
        verb = _verb(subparsers, name, about, handler)
        verb.add_argument("service", metavar="SERVICE")
        verb.add_argument("instance_id", metavar="ID")
        verb.add_argument("--token", default=os.environ.get("REGDISC_TOKEN"),
                          required="REGDISC_TOKEN" not in os.environ,
                          help="the instance's token (or REGDISC_TOKEN, kept out of ps)")


def _verb(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    about: str,
    handler: Verb,
) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=about, description=about[0].upper() + about[1:] + ".")
    connection = parser.add_argument_group(
        "connection", "Defaults come from the environment, then the development PKI."
    )
    connection.add_argument("--url", action="append", default=None, metavar="URL",
                            help="registry URL; repeatable for failover "
                            f"(REGDISC_URL, comma-separated; default {DEFAULT_URL})")
    connection.add_argument("--cert", type=Path, help="client certificate (REGDISC_CLIENT_CERT)")
    connection.add_argument("--key", type=Path, help="client key (REGDISC_CLIENT_KEY)")
    connection.add_argument("--ca", type=Path, help="root CA (REGDISC_CA)")
    connection.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                            help="per request (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the raw data as JSON")
    parser.set_defaults(func=lambda args: _run(handler, args))
    return parser


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected K=V, not {text!r}")
    return key, value


def _run(handler: Verb, args: argparse.Namespace) -> int:
    """Run ``handler`` on the reactor; print its output; map failures to exit statuses."""
    try:
        tls = ClientTLS.from_environment(os.environ, args.cert, args.key, args.ca)
    except ClientTLSError as e:
        return fail(str(e), 3)
    urls = args.url or [u for u in os.environ.get("REGDISC_URL", DEFAULT_URL).split(",") if u]

    async def go(reactor: Any) -> None:
        client = RegistryClient(urls, tls, reactor, timeout=args.timeout)
        try:
            text = await handler(client, args, reactor)
        except TLSRefused as e:
            whom = ("the registry refused our client certificate" if e.side == "registry"
                    else "we refused the registry's certificate")
            raise SystemExit(fail(f"{e.url}: {whom}: {e.reason}", 3))
        except RegistryUnavailable as e:
            raise SystemExit(fail(f"{e.url}: {e.reason}", 3))
        except RegistryError as e:
            detail = "; ".join(f"{k}: {v}" for k, v in e.details.items())
            raise SystemExit(fail(f"{e.code} ({e.status}): {e.message}"
                                   + (f" [{detail}]" if detail else ""), 1))
        finally:
            await client.close()
        if text:
            print(text)

    try:
        react(lambda reactor: Deferred.fromCoroutine(go(reactor)))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


# The verbs. Each returns what to print.


async def _services(client: RegistryClient, args: argparse.Namespace, reactor: Any) -> str:
    services = await client.services()
    if args.json:
        return output.as_json([{"name": s.name, "instances": s.instances} for s in services])
    return output.table(("SERVICE", "INSTANCES"), [(s.name, s.instances) for s in services])


async def _instances(client: RegistryClient, args: argparse.Namespace, reactor: Any) -> str:
    found = await client.instances(
        args.service, status=args.status, tags=args.tags, metadata=dict(args.metadata)
    )
    if args.json:
        return output.as_json([i.to_json() for i in found])
    return output.instance_rows(found)


async def _instance(client: RegistryClient, args: argparse.Namespace, reactor: Any) -> str:
    found = await client.instance(args.service, args.instance_id)
    return output.as_json(found.to_json()) if args.json else output.instance_fields(found)


async def _register(client: RegistryClient, args: argparse.Namespace, reactor: Any) -> str:
    if args.keep_alive:
        return await _keep_alive(client, args, reactor)
    registered = await client.register(
        args.service,
        args.host,
        args.port,
        instance_id=args.instance_id,
        ttl=args.ttl,
        status=args.status,
        tags=args.tags,
        metadata=dict(args.metadata) if args.metadata is not None else None,
    )
    data = {
        "instance": registered.instance.to_json(),
        "token": registered.token,
        "token_expires_at": rfc3339(registered.token_expires_at),
    }
    if args.json:
        return output.as_json(data)
    return output.fields(
        [("id", registered.instance.id), ("token", registered.token),
         ("token_expires_at", data["token_expires_at"]),
         ("expires_at", data["instance"]["expires_at"])]
    )


async def _keep_alive(client: RegistryClient, args: argparse.Namespace, reactor: Any) -> str:
    from ..client.registration import InstanceRegistration

    options: dict[str, Any] = {"clock": reactor, "instance_id": args.instance_id}
    for name in ("ttl", "status", "tags"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.metadata is not None:
        options["metadata"] = dict(args.metadata)
    registration = InstanceRegistration(client, args.service, args.host, args.port, **options)
    registration.startService()
    print(f"keeping {args.service}/{registration.instance_id} registered; Ctrl-C deregisters",
          file=sys.stderr, flush=True)
    stopped: Deferred = Deferred()
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: registration.stopService().addBoth(stopped.callback)
    )
    await stopped
    return ""


async def _heartbeat(client: RegistryClient, args: argparse.Namespace, reactor: Any) -> str:
    lease = await client.heartbeat(args.service, args.instance_id, args.token)
    data = {"ttl": lease.ttl, "expires_at": rfc3339(lease.expires_at)}
    return output.as_json(data) if args.json else output.fields(list(data.items()))


async def _rotate(client: RegistryClient, args: argparse.Namespace, reactor: Any) -> str:
    token = await client.rotate_token(args.service, args.instance_id, args.token)
    data = {"token": token.token, "token_expires_at": rfc3339(token.expires_at)}
    return output.as_json(data) if args.json else output.fields(list(data.items()))


async def _deregister(client: RegistryClient, args: argparse.Namespace, reactor: Any) -> str:
    removed = await client.deregister(args.service, args.instance_id, args.token)
    return output.as_json(removed.to_json()) if args.json else f"deregistered {removed.service}/{removed.id}"
