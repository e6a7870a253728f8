"""API keys and TLS end to end: keys made by `quiver auth create-key`, a `quiver demo` that requires
them (and one serving mutual TLS), the client's `api_key` and TLS options, and logs that never
contain a key."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import os
import pathlib
import re
import subprocess
import urllib.error
import urllib.request

import grpc
import pytest

from conftest import ROOT, start_quiver, stop_quiver
from quiver_client import AsyncQuiverClient, QuiverClient, QuiverError


def _create_key(keys: pathlib.Path, name: str, scopes: str) -> str:
    binary = os.environ.get("QUIVER_BIN", str(ROOT / "target" / "debug" / "quiver"))
    out = subprocess.run(
        [binary, "auth", "create-key", "--name", name, "--scopes", scopes, "--keys-file", str(keys)],
        check=True,
        capture_output=True,
        text=True,
    )
    key = out.stdout.strip()
    assert re.fullmatch(r"qv_[0-9a-f]{64}", key), key
    return key


def _demo_args(data: pathlib.Path) -> list:
    return [
        "demo", "--users", "50", "--products", "10", "--rate", "0",
        "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0",
        "--store-path", str(data / "online.redb"), "--archive", str(data / "offline"),
    ]


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    data = tmp_path_factory.mktemp("secured")
    keys = data / "keys.toml"
    reader = _create_key(keys, "notebook", "read")
    writer = _create_key(keys, "producer", "write,read")
    text = keys.read_text()
    assert reader not in text and writer not in text, "the keys file holds digests only"
    log = data / "quiver.log"
    with open(log, "w") as err:
        proc, grpc_addr, http_addr = start_quiver(
            _demo_args(data) + ["--auth-keys-file", str(keys)],
            stderr=err,
            env={**os.environ, "QUIVER_LOG": "debug"},
        )
        yield {"grpc": grpc_addr, "http": f"http://{http_addr}", "reader": reader, "writer": writer, "log": log}
        stop_quiver(proc)


def _row(age: int) -> dict:
    return {
        "entity_key": {"user_id": "user_1"},
        "event_timestamp": dt.datetime.now(dt.timezone.utc),
        "features": {"age": age},
    }


def test_calls_need_a_key_with_the_scope(secured):
    with QuiverClient(secured["grpc"], api_key="") as anonymous:
        with pytest.raises(QuiverError) as e:
            anonymous.registry()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer" in e.value.message
    with QuiverClient(secured["grpc"], api_key="qv_" + "0" * 64) as wrong:
        with pytest.raises(QuiverError) as e:
            wrong.registry()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert "0" * 64 not in e.value.message
    with QuiverClient(secured["grpc"], api_key=secured["reader"]) as reader:
        assert any(v.name == "user_profile" for v in reader.registry().feature_views)
        cols = reader.get_online_features({"user_id": ["user_1"]}, feature_service="user_service")
        assert 18 <= cols["age"][0] < 78
        with pytest.raises(QuiverError) as e:
            reader.write_features("user_profile", [_row(40)])
        assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert '"notebook" lacks scope "write"' in e.value.message
    os.environ["QUIVER_API_KEY"] = secured["writer"]
    try:
        with QuiverClient(secured["grpc"]) as writer:
            assert writer.write_features("user_profile", [_row(41)])["written"] == 1
            assert writer.get_online_features({"user_id": ["user_1"]}, features=["user_profile:age"])["age"] == [41]
    finally:
        del os.environ["QUIVER_API_KEY"]


def test_rest_needs_a_bearer_key(secured):
    url = secured["http"] + "/api/v1/features/user/user_1"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url, timeout=10)
    assert e.value.code == 401
    assert e.value.headers["www-authenticate"].startswith("Bearer")
    assert json.loads(e.value.read())["error"]["code"] == "unauthenticated"
    req = urllib.request.Request(url, headers={"authorization": f"Bearer {secured['reader']}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert json.loads(resp.read())["entity"] == "user"


def test_zz_logs_hold_no_key(secured):
    # Debug logs of a run that accepted and refused keys: names, never keys.
    text = secured["log"].read_text()
    assert "request refused" in text
    for key in (secured["reader"], secured["writer"], "0" * 64):
        assert key not in text
        assert key[3:19] not in text


def _pki(dir: pathlib.Path) -> dict:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject, key, issuer, issuer_key, ca=False, sans=None, usage=None):
        b = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        if usage:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def write(path, data):
        path.write_bytes(data)
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("test CA", ca_key, "test CA", ca_key, ca=True)
    out = {"ca": write(dir / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))}
    for who, sans, usage in [
        ("server", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", None, ExtendedKeyUsageOID.CLIENT_AUTH),
    ]:
        key = ec.generate_private_key(ec.SECP256R1())
        c = cert(who, key, "test CA", ca_key, sans=sans, usage=usage)
        out[who] = write(dir / f"{who}.pem", c.public_bytes(serialization.Encoding.PEM))
        out[f"{who}_key"] = write(
            dir / f"{who}.key",
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
    return out


def test_mutual_tls_with_an_api_key(tmp_path):
    pki = _pki(tmp_path)
    keys = tmp_path / "keys.toml"
    key = _create_key(keys, "model-server", "read")
    proc, grpc_addr, _ = start_quiver(
        _demo_args(tmp_path)
        + ["--auth-keys-file", str(keys), "--tls-cert", str(pki["server"]), "--tls-key", str(pki["server_key"]),
           "--tls-client-ca", str(pki["ca"])]
    )
    try:
        target = "localhost:" + grpc_addr.rsplit(":", 1)[1]
        ca = pki["ca"].read_bytes()
        # Mutual TLS: the test CA, and the client certificate the server requires.
        mtls = {
            "root_certificates": ca,
            "certificate_chain": pki["client"].read_bytes(),
            "private_key": pki["client_key"].read_bytes(),
        }
        with QuiverClient(target, api_key=key, **mtls) as client:
            assert any(v.name == "user_profile" for v in client.registry().feature_views)

        # The asyncio client takes the same options.
        async def async_calls() -> None:
            async with AsyncQuiverClient(target, api_key=key, **mtls) as aclient:
                cols = await aclient.get_online_features({"user_id": ["user_1"]}, features=["user_profile:age"])
                assert cols.statuses["age"] == ["PRESENT"]
            async with AsyncQuiverClient(target, api_key="qv_" + "0" * 64, **mtls) as wrong:
                with pytest.raises(QuiverError) as e:
                    await wrong.registry()
                assert e.value.code == grpc.StatusCode.UNAUTHENTICATED

        asyncio.run(async_calls())
        # No client certificate: the handshake is refused, whatever the key.
        with QuiverClient(target, api_key=key, root_certificates=ca, timeout=5) as client:
            with pytest.raises(QuiverError) as e:
                client.registry()
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
        # Plain text to a TLS port gets nowhere either.
        with QuiverClient(target, api_key=key, timeout=5) as client:
            with pytest.raises(QuiverError) as e:
                client.registry()
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        stop_quiver(proc)
