"""hello: a small Twisted web service that registers itself and discovers a greeter.

Run it beside `twistd -n regdisc` (it finds the development PKI by itself):

    twistd -n --pidfile= -y examples/hello.tac

It answers on http://127.0.0.1:8081/ with a `greeter` instance picked from the
registry, and stays registered as `hello` until it stops.
"""

import os

from twisted.application import service, strports
from twisted.internet import reactor
from twisted.web import resource, server

from regdisc.client import ClientTLS, InstanceRegistration, RegistryClient, ServiceWatcher

PORT = int(os.environ.get("HELLO_PORT", "8081"))
URLS = os.environ.get("REGDISC_URL", "https://localhost:8443").split(",")

application = service.Application("hello")
registry = RegistryClient(URLS, ClientTLS.from_environment(os.environ), reactor)

# Discovery: follow the greeters' list with blocking queries, served from memory.
greeters = ServiceWatcher(registry, ["greeter"], clock=reactor)
greeters.setServiceParent(application)


class Hello(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain")
        greeter = greeters.pick("greeter")
        if greeter is None:
            return b"hello; no greeter is up\n"
        return f"hello; ask the greeter at {greeter.host}:{greeter.port}\n".encode()


site = server.Site(Hello())
strports.service(f"tcp:{PORT}:interface=127.0.0.1", site).setServiceParent(application)

# Registration: these lines keep `hello` registered for the application's whole life.
InstanceRegistration(
    registry, "hello", "127.0.0.1", PORT, clock=reactor
).setServiceParent(application)
