"""TLS, mutual TLS for agents and bearer tokens for queries, with real certificates."""

from __future__ import annotations

import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from fleetprof.aggregator.server import Aggregator
from fleetprof.cli import main
from fleetprof.node_agent.batch import Batch
from fleetprof.node_agent.shipper import Shipper
from fleetprof.node_agent.spool import Spool
from fleetprof.proto.ingest.v1 import ingest_pb2_grpc
from fleetprof.proto.security import ClientSecurity, ServerSecurity, parse_agent_credentials
from fleetprof.query.sandbox import QueryError
from fleetprof.query.source import AggregatorSource
from tests.unit.test_ingest import STACKS, batch, samples

TOKEN = "s3cret-token"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    agent_cert: Path
    agent_key: Path
    rogue_cert: Path
    rogue_key: Path


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def issue(directory: Path, name: str, ca: str, subject: str, san: str = "") -> tuple[Path, Path]:
    key, csr, cert = (directory / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", subject)
    extensions = directory / f"{name}.ext"
    extensions.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    openssl(
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        directory / f"{ca}.pem",
        "-CAkey",
        directory / f"{ca}.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        cert,
        "-extfile",
        extensions,
    )
    return cert, key


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue-ca"):
        openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            directory / f"{ca}.key",
            "-out",
            directory / f"{ca}.pem",
            "-subj",
            f"/CN={ca}",
        )
    server = issue(directory, "server", "ca", "/CN=aggregator", "IP:127.0.0.1,DNS:localhost")
    agent = issue(directory, "agent", "ca", "/CN=agent-node-1")
    rogue = issue(directory, "rogue", "rogue-ca", "/CN=intruder")
    return Pki(directory / "ca.pem", *server, *agent, *rogue)


@pytest.fixture
def secure_aggregator(tmp_path: Path, pki: Pki) -> Iterator[Aggregator]:
    security = ServerSecurity(
        cert=str(pki.server_cert),
        key=str(pki.server_key),
        client_ca=str(pki.ca),
        tokens={TOKEN: None},
    )
    server = Aggregator(tmp_path / "p.duckdb", "127.0.0.1:0", security=security)
    server.start()
    yield server
    server.stop(grace_s=0)


def ingest(address: str, security: ClientSecurity, node: str = "node-a") -> grpc.StatusCode:
    channel = security.channel(address)
    try:
        batches = iter([batch(1, node=node, agent_id=f"{node}/1")])
        list(ingest_pb2_grpc.IngestServiceStub(channel).Ingest(batches, timeout=10))
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()
    finally:
        channel.close()


def test_agents_need_a_client_certificate(secure_aggregator: Aggregator, pki: Pki) -> None:
    address = secure_aggregator.address
    ca = str(pki.ca)
    # The TLS handshake itself refuses these: no certificate, one from another CA, plaintext.
    assert ingest(address, ClientSecurity(ca=ca)) == grpc.StatusCode.UNAVAILABLE
    rogue = ClientSecurity(ca=ca, cert=str(pki.rogue_cert), key=str(pki.rogue_key))
    assert ingest(address, rogue) == grpc.StatusCode.UNAVAILABLE
    assert ingest(address, ClientSecurity(insecure=True)) == grpc.StatusCode.UNAVAILABLE
    agent = ClientSecurity(ca=ca, cert=str(pki.agent_cert), key=str(pki.agent_key))
    assert ingest(address, agent) == grpc.StatusCode.OK


def test_client_certificates_are_bound_to_their_nodes(tmp_path: Path, pki: Pki) -> None:
    """With the certificate named in the agent credentials, it writes its nodes only; a
    certificate of the CA that is not named there writes nothing."""
    credentials = tmp_path / "agents"
    credentials.write_text("cert:agent-node-1 nodes=node-a,rack-7-*\n")
    with credentials.open() as lines:
        agents = parse_agent_credentials(lines)
    security = ServerSecurity(
        cert=str(pki.server_cert), key=str(pki.server_key), client_ca=str(pki.ca), agents=agents
    )
    server = Aggregator(tmp_path / "p.duckdb", "127.0.0.1:0", security=security)
    server.start()
    try:
        agent = ClientSecurity(ca=str(pki.ca), cert=str(pki.agent_cert), key=str(pki.agent_key))
        assert ingest(server.address, agent, "node-a") == grpc.StatusCode.OK
        assert ingest(server.address, agent, "rack-7-3") == grpc.StatusCode.OK
        assert ingest(server.address, agent, "node-b") == grpc.StatusCode.PERMISSION_DENIED
        server_cert = ClientSecurity(
            ca=str(pki.ca), cert=str(pki.server_cert), key=str(pki.server_key)
        )
        assert ingest(server.address, server_cert) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(grace_s=0)
    with pytest.raises(ValueError, match="line 1"):
        parse_agent_credentials(["token-without-nodes"])


def test_shipper_delivers_over_mutual_tls(secure_aggregator, pki: Pki, tmp_path: Path) -> None:
    agent = ClientSecurity(ca=str(pki.ca), cert=str(pki.agent_cert), key=str(pki.agent_key))
    shipper = Shipper(secure_aggregator.address, "a", "n", Spool(tmp_path, 1 << 20), agent)
    shipper.ship(Batch(samples({11: 3}), {11: STACKS[11]}))
    assert shipper.stats["acked"] == 1 and shipper.pending == 0
    shipper.close()


def query(address: str, security: ClientSecurity) -> list[dict]:
    source = AggregatorSource(address, security=security)
    try:
        with source.stream("SELECT 42 AS answer") as reader:
            return reader.read_all().to_pylist()
    finally:
        source.close()


def test_queries_need_a_token(secure_aggregator: Aggregator, pki: Pki) -> None:
    user = {"ca": str(pki.ca), "cert": str(pki.agent_cert), "key": str(pki.agent_key)}
    for token in (None, "wrong"):
        with pytest.raises(QueryError, match="bearer token"):
            query(secure_aggregator.address, ClientSecurity(**user, token=token))
    answer = query(secure_aggregator.address, ClientSecurity(**user, token=TOKEN))
    assert answer == [{"answer": 42}]


def test_plaintext_is_refused_off_loopback(tmp_path: Path, capsys) -> None:
    status = main(["aggregator", "--db", str(tmp_path / "p.duckdb"), "--listen", "0.0.0.0:0"])
    assert status == 2
    assert "without TLS" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a loopback address"):
        ClientSecurity().channel("10.0.0.7:7470")
    # Explicitly insecure is allowed (no connection is made by creating a channel).
    ClientSecurity(insecure=True).channel("10.0.0.7:7470").close()


def test_web_ui_over_https_needs_a_token(tmp_path: Path, pki: Pki) -> None:
    security = ServerSecurity(
        cert=str(pki.server_cert), key=str(pki.server_key), tokens={TOKEN: None}
    )
    aggregator = Aggregator(
        tmp_path / "p.duckdb", "127.0.0.1:0", security=security, http_listen="127.0.0.1:0"
    )
    aggregator.start()
    trusted = ssl.create_default_context(cafile=str(pki.ca))
    meta = f"{aggregator.web.url}api/meta"
    assert meta.startswith("https://")

    def status(url: str, headers: dict[str, str] | None = None) -> int:
        request = urllib.request.Request(url, headers=headers or {})
        try:
            with urllib.request.urlopen(request, context=trusted, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    # A client that connects and never starts TLS holds one pool thread, not the server.
    idle = socket.create_connection(("127.0.0.1", int(aggregator.web.address.rsplit(":", 1)[1])))
    try:
        assert status(meta) == 401
        assert status(meta, {"Authorization": "Bearer wrong"}) == 401
        assert status(meta, {"Authorization": f"Bearer {TOKEN}"}) == 200
        # A browser logs in once: the token moves into an HttpOnly, Secure cookie.
        opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=trusted),
            urllib.request.HTTPCookieProcessor(),
        )
        with opener.open(f"{aggregator.web.url}?token={TOKEN}", timeout=10) as page:
            assert page.status == 200 and page.url == aggregator.web.url
        with opener.open(meta, timeout=10) as answer:
            assert answer.status == 200
        # Plaintext HTTP to the HTTPS port gets nothing.
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(meta.replace("https://", "http://"), timeout=10)
    finally:
        idle.close()
        aggregator.stop(grace_s=0)
