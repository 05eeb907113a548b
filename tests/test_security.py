"""Serving that is safe to expose (issue 22), shown against real servers.

One `tlsan serve` with an API keys file for the module (keys of different scopes and rates,
a small queue, a short header timeout, a Host allow-list), plus short-lived servers for what
must fail at start-up. Then the parts without a server: the keys file, the limits, the
strict JSON reader, the Host policy, the log filter and the OpenAPI document.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from serving.auth import AuthError, HostPolicy, KeyRing
from serving.limits import InFlight, TokenBuckets, UserEventCap, retry_after
from serving.log_safety import OneLineFilter, escape
from serving.openapi import build_openapi
from serving.request_body import BodyError, parse_json, validate
from serving.schemas import EventsRequest, RecommendRequest
from tests.servers import BentoServer, bento_server, free_port
from tlsan.api_keys import create_key, read_keys, revoke_key
from tlsan.bundle import sha256
from tlsan.cli import main
from tlsan.errors import ConfigError
from tlsan.serve_settings import ServeSettings, check_bind, settings_from_env

ROOT = Path(__file__).resolve().parents[1]
TLSAN = [sys.executable, "-m", "tlsan"]
BENTO_SERVE = [sys.executable, "-m", "bentoml", "serve", "serving.service:TlsanService"]


# ------------------------------------------------------------------ the keyed server
@dataclass
class Secured:
    server: BentoServer
    bundle: Path
    keys_file: Path
    keys: dict[str, str]  # name -> token
    item: str  # an item id of the catalog

    def post(
        self, path: str, body: object, key: str | None = "full", **headers: str
    ) -> httpx.Response:
        sent = {"content-type": "application/json", **headers}
        if key is not None:
            sent["authorization"] = f"Bearer {self.keys[key]}"
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(f"{self.server.url}{path}", content=content, headers=sent, timeout=30)

    def get(self, path: str, key: str | None = "full", **headers: str) -> httpx.Response:
        if key is not None:
            headers["authorization"] = f"Bearer {self.keys[key]}"
        return httpx.get(f"{self.server.url}{path}", headers=headers, timeout=30)


@pytest.fixture(scope="module")
def secured(
    dm_bundle: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Secured]:
    data, bundle = dm_bundle
    work = tmp_path_factory.mktemp("secured")
    keys_file = work / "keys.json"
    keys = {}
    for name, scopes, rate, burst in (
        ("full", "recommend,events,explain,admin", 10_000.0, None),
        ("shop", "recommend,events", 10_000.0, None),
        ("reader", "recommend", 10_000.0, None),
        ("slow", "recommend", 0.1, 2.0),
        ("doomed", "recommend", None, None),
    ):
        _, keys[name] = create_key(keys_file, name, scopes, rate_limit=rate, rate_burst=burst)
    command = [sys.executable, "-m", "tlsan", "serve", "--bundle", str(bundle),
               "--store", f"sqlite:///{work / 'store.db'}", "--port", "{port}",
               "--api-keys", str(keys_file), "--user-events-per-minute", "20",
               "--max-queue", "2", "--header-timeout", "2",
               "--allowed-hosts", "localhost,127.0.0.1"]  # fmt: skip
    import polars as pl

    item = pl.read_parquet(data / "vocab/items.parquet")["item_id"][0]
    with bento_server(command) as server:
        yield Secured(server, bundle, keys_file, keys, item)


def _log_since(server: BentoServer, offset: int) -> list[str]:
    return server.log.read_text(errors="replace")[offset:].splitlines()


def _wait_for(predicate: object, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.2)
    return False


# ------------------------------------------------------------------ authentication, scopes
def test_no_key_or_a_bad_key_is_401_with_a_json_body(secured: Secured) -> None:
    token = secured.keys["full"]
    wrong_secret = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    unknown_id = "tlsan_000000000000_" + token.split("_", 2)[2]
    for header in (None, "Basic dXNlcjpwYXNz", f"Bearer {token}x", f"Bearer {wrong_secret}",
                   f"Bearer {unknown_id}", "Bearer x"):  # fmt: skip
        headers = {"content-type": "application/json"}
        if header is not None:
            headers["authorization"] = header
        for path in ("/recommend", "/events", "/similar_items"):
            response = httpx.post(f"{secured.server.url}{path}", content=b"{}", headers=headers)
            assert response.status_code == 401, (header, path)
            body = response.json()
            assert body["detail"][0]["loc"] == ["header", "authorization"]
            assert response.headers["www-authenticate"].startswith("Bearer")
        for path in ("/model", "/metrics", "/no-such-path"):
            assert httpx.get(f"{secured.server.url}{path}", headers=headers).status_code == 401


def test_scopes_decide_what_a_key_may_do(secured: Secured) -> None:
    assert secured.post("/recommend", {"user_id": "u1", "k": 3}, key="shop").status_code == 200
    for path in ("/model", "/metrics"):
        refused = secured.get(path, key="shop")
        assert refused.status_code == 403 and "admin" in refused.json()["error"]
        assert secured.get(path, key="full").status_code == 200
    events = {"user_id": "u1", "events": [{"item_id": secured.item, "timestamp": 1_000}]}
    denied = secured.post("/events", events, key="reader")
    assert denied.status_code == 403 and "events" in denied.json()["error"]
    assert secured.post("/events", events, key="shop").status_code == 200
    # explain reads a user's stored items and times: its own scope
    explain = {"user_id": "u1", "k": 3, "explain": True}
    hidden = secured.post("/recommend", explain, key="shop")
    assert hidden.status_code == 403 and hidden.json()["detail"][0]["loc"] == ["explain"]
    shown = secured.post("/recommend", explain, key="full")
    assert shown.status_code == 200 and "explanation" in shown.json()
    # open without a key: health probes and the OpenAPI document
    for path in ("/healthz", "/livez", "/readyz", "/docs.json"):
        assert secured.get(path, key=None).status_code == 200, path


def test_model_shows_no_path_of_the_server(secured: Secured) -> None:
    response = secured.get("/model")
    assert response.status_code == 200
    assert response.json()["model_version"].startswith("tlsan-")
    assert str(secured.bundle.parent) not in response.text
    assert "/tmp" not in response.text and str(Path.home()) not in response.text


def test_revoked_key_is_refused_within_seconds(secured: Secured) -> None:
    assert secured.post("/recommend", {"user_id": "u"}, key="doomed").status_code == 200
    assert main(["keys", "revoke", "--file", str(secured.keys_file), "--name", "doomed"]) == 0
    assert _wait_for(
        lambda: secured.post("/recommend", {"user_id": "u"}, key="doomed").status_code == 401
    )
    assert secured.post("/recommend", {"user_id": "u"}, key="reader").status_code == 200


# ------------------------------------------------------------------ users' data, abuse limits
def test_events_from_the_future_are_refused(secured: Secured) -> None:
    now = int(time.time())
    late = {"user_id": "victim", "events": [{"item_id": secured.item, "timestamp": now + 3_600}]}
    refused = secured.post("/events", late)
    assert refused.status_code == 400
    assert refused.json()["detail"][0]["loc"] == ["events", 0, "timestamp"]
    assert "future" in refused.json()["error"]
    within = {"user_id": "victim", "events": [{"item_id": secured.item, "timestamp": now + 60}]}
    assert secured.post("/events", within).status_code == 200


def test_per_user_events_per_minute_cap(secured: Secured) -> None:
    user = f"busy-{uuid.uuid4().hex[:8]}"
    events = [{"item_id": secured.item, "timestamp": 1_000 + n} for n in range(20)]
    first = secured.post("/events", {"user_id": user, "events": events})
    if first.status_code == 429:  # the minute turned between our requests: a fresh window
        first = secured.post("/events", {"user_id": user, "events": events})
    assert first.status_code == 200 and first.json()["stored"] == 20
    more = secured.post("/events", {"user_id": user, "events": events[:1]})
    assert more.status_code == 429
    assert 1 <= int(more.headers["retry-after"]) <= 60
    assert more.json()["detail"][0]["loc"] == ["user_id"]
    other = {"user_id": f"{user}-other", "events": events[:1]}
    assert secured.post("/events", other).status_code == 200


def test_rate_limit_answers_429_then_recovers(secured: Secured) -> None:
    statuses = []
    for _ in range(10):  # the bucket holds 2 tokens and refills one every 10 s
        response = secured.post("/recommend", {"user_id": "u", "k": 1}, key="slow")
        statuses.append(response.status_code)
        if response.status_code == 429:
            break
    assert statuses[-1] == 429 and set(statuses[:-1]) <= {200}
    assert response.json()["detail"][0]["type"] == "rate_limited"
    wait = int(response.headers["retry-after"])
    assert 1 <= wait <= 10
    time.sleep(wait)
    assert secured.post("/recommend", {"user_id": "u", "k": 1}, key="slow").status_code == 200


def _hold_a_slot(secured: Secured) -> socket.socket:
    """A request whose headers are complete but whose body is still on its way: it holds
    one of the worker's in-flight places until the body ends."""
    sock = socket.create_connection(("127.0.0.1", secured.server.port), timeout=30)
    head = (
        f"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {secured.keys['full']}\r\ncontent-length: 20\r\n\r\n"
    )
    sock.sendall(head.encode() + b'{"user_id":')
    return sock


def test_queue_full_answers_503_then_recovers(secured: Secured) -> None:
    holders = []
    try:
        assert _wait_for(lambda: secured.get("/healthz", key=None).status_code == 200)
        for _ in range(2):  # --max-queue 2
            holders.append(_hold_a_slot(secured))
        assert _wait_for(
            lambda: secured.post("/recommend", {"user_id": "u"}).status_code == 503, 10
        )
        busy = secured.post("/similar_items", {"item_id": secured.item})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert busy.json()["detail"][0]["type"] == "overloaded"
        for sock in holders:  # finish the held requests: they are answered normally
            sock.sendall(b' "held"}' + b" " * 1)
            assert sock.recv(64).startswith(b"HTTP/1.1 200")
    finally:
        for sock in holders:
            sock.close()
    assert _wait_for(lambda: secured.post("/recommend", {"user_id": "u"}).status_code == 200)


def test_slow_headers_are_cut_off(secured: Secured) -> None:
    with socket.create_connection(("127.0.0.1", secured.server.port), timeout=30) as sock:
        sock.sendall(b"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and then nothing
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    assert received.startswith(b"HTTP/1.1 408")
    assert json.loads(received.split(b"\r\n\r\n", 1)[1])["detail"][0]["type"] == "header_timeout"


def test_hosts_json_only_and_the_id_contract(secured: Secured) -> None:
    rebound = secured.post("/recommend", {"user_id": "u"}, host="evil.example")
    assert rebound.status_code == 400 and rebound.json()["detail"][0]["loc"] == ["header", "host"]
    assert secured.get("/readyz", key=None, host="evil.example").status_code == 200
    assert secured.post("/recommend", {"user_id": "u"}, host="localhost:1234").status_code == 200
    plain = secured.post(
        "/events", b'{"user_id": "u", "events": []}', **{"content-type": "text/plain"}
    )
    assert plain.status_code == 415
    for body, field in (
        (b'{"user_id": "u", "user_id": "v"}', "user_id"),
        (b'{"user_id": "u", "events": [{"item_id": "i", "timestamp": 1, "timestamp": 2}]}', "timestamp"),
        (json.dumps({"user_id": "a\x00b"}).encode(), "user_id"),
        (json.dumps({"user_id": "a\r\nb"}).encode(), "user_id"),
        (json.dumps({"user_id": "a\u2028b"}).encode(), "user_id"),
        (json.dumps({"user_id": "x" * 257}).encode(), "user_id"),
        (b'{"user_id": ' + b"9" * 4_300 + b"}", "user_id"),  # parses, out of int64
        (b'{"user_id": ' + b"9" * 4_301 + b"}", "body"),  # beyond what Python parses
        (json.dumps({"user_id": 2**63}).encode(), "user_id"),
        (json.dumps({"user_id": -(2**63) - 1}).encode(), "user_id"),
        (json.dumps({"user_id": "u", "k": 1.5}).encode(), "k"),
    ):  # fmt: skip
        refused = secured.post("/recommend", body)
        assert refused.status_code == 400, body[:80]
        assert field in json.dumps(refused.json()["detail"]), (field, refused.text[:200])
    for user in (2**63 - 1, -(2**63), "x" * 256, "é 漢字 tab-free"):
        assert secured.post("/recommend", {"user_id": user}).status_code == 200, user


def test_rejections_log_one_safe_line_each(secured: Secured) -> None:
    """A JSON key or a path with a newline cannot start a log line; each rejected request
    is one INFO/WARNING line with its status and field, without the input or a traceback."""
    offset = len(secured.server.log.read_text(errors="replace"))
    marker = uuid.uuid4().hex
    forged = f"\n2026-01-01T00:00:00+0000 [ERROR] FORGED-{marker}"
    secret = f"SECRET-{marker}"
    requests = [
        lambda: secured.post("/recommend", {"user_id": "u", forged: 1}),
        lambda: secured.post("/recommend", {"user_id": secret, "k": "ten"}),
        lambda: secured.get(f"/a%0A2026-01-01%20[ERROR]%20FORGED-{marker}"),
        lambda: secured.get(f"/b%0D%0AFORGED-{marker}", key=None),
        lambda: secured.post("/events", {"user_id": secret, "events": []}),
        lambda: secured.post("/recommend", b"{" + secret.encode(), key="shop"),
    ]
    statuses = [send().status_code for send in requests]
    assert statuses == [400, 400, 404, 401, 400, 400]
    assert _wait_for(
        lambda: sum(" rejected " in line for line in _log_since(secured.server, offset)) >= 6
    )
    lines = _log_since(secured.server, offset)
    rejected = [line for line in lines if " rejected " in line]
    assert len(rejected) == len(requests), rejected
    assert not any(line.lstrip().startswith(("2026-01-01", "FORGED")) for line in lines)
    assert not any(secret in line for line in lines)  # the input is never logged
    assert not any("Traceback" in line for line in lines)
    assert all("[INFO]" in line or "[WARNING]" in line for line in rejected)
    assert all("status=" in line and "field=" in line for line in rejected)
    assert [line for line in rejected if f"FORGED-{marker}" in line][0].count("\\n") >= 1
    assert max(len(line) for line in rejected) < 600
    # the access log line of a rejected request is dropped: one line per rejection
    assert not any("status=40" in line and "scheme=http" in line for line in lines)


# ------------------------------------------------------------------ the OpenAPI contract, fuzzed
def test_schemathesis_finds_no_5xx_and_no_nonconforming_answer(secured: Secured) -> None:
    """Every operation of the served document, with a valid key: no 5xx, every status,
    content type, header and body as documented, invalid input refused, missing or bad keys
    refused, undocumented methods 405. (`positive_data_acceptance` is left out: schema-valid
    requests may name an unknown category, a future timestamp or an over-cap user, which
    the service refuses by design and documents as 400/429.)"""
    checks = ("not_a_server_error,status_code_conformance,content_type_conformance,"
              "response_headers_conformance,response_schema_conformance,"
              "negative_data_rejection,ignored_auth,unsupported_method,"
              "missing_required_header,allow_header_conformance")  # fmt: skip
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "run",
         f"{secured.server.url}/docs.json", "--url", secured.server.url,
         "-H", f"Authorization: Bearer {secured.keys['full']}", "--checks", checks,
         "--max-examples", "60", "--generation-deterministic", "--workers", "1",
         "--phases", "examples,coverage,fuzzing", "--no-color"],
        capture_output=True, text=True, timeout=900, cwd=secured.server.log.parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "No issues found" in proc.stdout
    tested = [line for line in proc.stdout.splitlines() if "Tested:" in line]
    assert tested and tested[0].split()[-1] == "8", tested


# ------------------------------------------------------------------ start-up refusals
def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def _copy(bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    return out


def _run(
    argv: list[str], env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", **(env or {})}
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full.get("PYTHONPATH")]))
    return subprocess.run(argv, capture_output=True, text=True, env=full, cwd=ROOT, timeout=timeout)


@pytest.mark.parametrize(
    "damage",
    ["model/model.safetensors", "index.faiss", "vocab/items.parquet", "model/model.onnx",
     "popularity.parquet", "flip:item_vectors.safetensors"],
)  # fmt: skip
def test_corrupt_bundle_is_refused_in_one_line(
    dm_bundle: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    bundle = _copy(dm_bundle[1], tmp_path)
    if damage.startswith("flip:"):  # same size, one byte changed
        path = bundle / damage[5:]
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:  # truncated
        path = bundle / damage
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    store = f"sqlite:///{tmp_path / 'store.db'}"
    assert main(["serve", "--bundle", str(bundle), "--store", store, "--port", "1"]) == 2
    captured = capsys.readouterr()
    line = _one_line(captured.err)
    assert path.name in line and ("corrupt" in line or "bytes" in line)
    assert captured.out == ""


def test_corrupt_bundle_starts_no_worker(dm_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    """As `tlsan serve` and as a bento (`bentoml serve`, the on_deployment check): exit 2,
    one line, and BentoML never reaches its workers."""
    bundle = _copy(dm_bundle[1], tmp_path)
    weights = bundle / "model/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    store = f"sqlite:///{tmp_path / 'store.db'}"
    port = str(free_port())
    proc = _run([*TLSAN, "serve", "--bundle", str(bundle), "--store", store, "--port", port])
    assert proc.returncode == 2 and "model.safetensors" in _one_line(proc.stderr)
    assert proc.stdout == ""
    env = {"TLSAN_BUNDLE": str(bundle), "TLSAN_STORE": store}
    proc = _run([*BENTO_SERVE, "--port", port], env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "model.safetensors" in _one_line(proc.stderr + proc.stdout)
    assert "Starting production" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("entry", ["../../etc/passwd", "/etc/passwd", "model/../../x"])
def test_manifest_paths_outside_the_bundle_are_refused(
    dm_bundle: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], entry: str
) -> None:
    bundle = _copy(dm_bundle[1], tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][entry] = {"sha256": "0" * 64, "bytes": 1}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    store = f"sqlite:///{tmp_path / 'store.db'}"
    assert main(["serve", "--bundle", str(bundle), "--store", store]) == 2
    assert "outside the bundle" in _one_line(capsys.readouterr().err)


def test_store_and_keys_problems_are_refused_before_starting(
    dm_bundle: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = str(dm_bundle[1])
    cases = [
        (["--store", f"sqlite:///{tmp_path / 'missing-dir' / 'store.db'}"], "does not exist"),
        (["--store", "sqlite:///:memory:"], "in-memory"),
        (["--api-keys", str(tmp_path / "no-keys.json")], "not found"),
        (["--host", "0.0.0.0"], "without API keys"),
        (["--host", "::"], "without API keys"),
        (["--allowed-hosts", "a b"], "--allowed-hosts"),
        (["--rate-limit", "0"], "--rate-limit"),
    ]
    (tmp_path / "bad-keys.json").write_text(
        '{"format": "tlsan-api-keys", "version": 1, "keys": [{}]}'
    )
    cases.append((["--api-keys", str(tmp_path / "bad-keys.json")], "keys[0]"))
    create_key(tmp_path / "revoked.json", "gone", "recommend")
    revoke_key(tmp_path / "revoked.json", name="gone")
    cases.append((["--api-keys", str(tmp_path / "revoked.json")], "no active API key"))
    for flags, expected in cases:
        store = ["--store", f"sqlite:///{tmp_path / 'ok.db'}"] if "--store" not in flags else []
        assert main(["serve", "--bundle", bundle, *store, *flags]) == 2, flags
        line = _one_line(capsys.readouterr().err)
        assert expected in line, (flags, line)
    assert not (tmp_path / "missing-dir").exists() and not (ROOT / ":memory:").exists()


def test_a_bento_refuses_a_public_bind_without_keys(
    dm_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    env = {"TLSAN_BUNDLE": str(dm_bundle[1]), "TLSAN_STORE": f"sqlite:///{tmp_path / 's.db'}"}
    port = str(free_port())
    proc = _run([*BENTO_SERVE, "--host", "0.0.0.0", "--port", port], env)
    assert proc.returncode == 2
    assert "without API keys" in _one_line(proc.stderr + proc.stdout)
    proc = _run([*BENTO_SERVE, "--port", port], {**env, "TLSAN_MAX_QUEUE": "lots"})
    assert proc.returncode == 2 and "TLSAN_MAX_QUEUE" in _one_line(proc.stderr + proc.stdout)


def test_a_worker_that_cannot_load_stops_the_server(
    dm_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    """Checksums that match but item vectors from other weights: only the worker finds out.
    The server (a plain `bentoml serve`, the bento's route; `tlsan serve` runs it and
    returns its status) exits non-zero instead of restarting the worker forever."""
    from safetensors.numpy import load_file, save_file

    bundle = _copy(dm_bundle[1], tmp_path)
    vectors_file = bundle / "item_vectors.safetensors"
    vectors = load_file(str(vectors_file))["item_vectors"]
    save_file({"item_vectors": np.ascontiguousarray(vectors * 1.5)}, str(vectors_file))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["item_vectors.safetensors"] = {
        "sha256": sha256(vectors_file),
        "bytes": vectors_file.stat().st_size,
    }
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    env = {"TLSAN_BUNDLE": str(bundle), "TLSAN_STORE": f"sqlite:///{tmp_path / 'store.db'}"}
    proc = _run(
        [*BENTO_SERVE, "--port", str(free_port())], env, timeout=300
    )  # as a bento would run
    assert proc.returncode == 3, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "listening on http://127.0.0.1:" in output  # no --host: loopback, the safe default
    assert "a worker could not start" in output and "does not match the bundled weights" in output
    assert output.count("worker cannot start") <= 3  # stopped, not restarted in a loop
    assert "Traceback" not in output


# ------------------------------------------------------------------ keys file and `tlsan keys`
def test_tlsan_keys_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys.json"
    assert (
        main(
            [
                "keys",
                "create",
                "--file",
                str(path),
                "--name",
                "shop",
                "--scopes",
                "events,recommend",
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    token = out.out.splitlines()[-1]
    assert out.out == token + "\n" and token.startswith("tlsan_")
    assert (path.stat().st_mode & 0o777) == 0o600
    text = path.read_text()
    assert token not in text and token.split("_", 2)[2] not in text  # stored hashed only
    assert [p.name for p in tmp_path.iterdir()] == ["keys.json"]  # no temp file left behind
    (record,) = read_keys(path)
    assert record.scopes == ("events", "recommend") and record.matches(token.split("_", 2)[2])
    assert main(["keys", "create", "--file", str(path), "--name", "shop", "--scopes", "admin"]) == 2
    assert "active key named 'shop'" in capsys.readouterr().err
    assert main(["keys", "create", "--file", str(path), "--name", "x", "--scopes", "root"]) == 2
    assert "unknown scope" in capsys.readouterr().err
    assert main(["keys", "list", "--file", str(path)]) == 0
    listing = capsys.readouterr().out
    assert "shop" in listing and record.sha256 not in listing and record.salt not in listing
    assert main(["keys", "revoke", "--file", str(path), "--id", record.id]) == 0
    assert read_keys(path)[0].revoked_at is not None
    assert main(["keys", "revoke", "--file", str(path), "--id", record.id]) == 2
    assert "no active key" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, expected",
    [
        ("not json", "not valid JSON"),
        ('{"format": "other"}', "not a tlsan API keys file"),
        ('{"format": "tlsan-api-keys", "version": 2, "keys": []}', "version 2"),
        ('{"format": "tlsan-api-keys", "version": 1, "keys": [{"id": "x"}]}', "keys[0]"),
    ],
)
def test_malformed_keys_files_name_what_is_wrong(
    tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        read_keys(path)


def test_key_ring_authenticates_and_follows_the_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    _, token = create_key(path, "a", "recommend")
    clock = [0.0]
    ring = KeyRing(path, clock=lambda: clock[0])
    principal = ring.authenticate(f"Bearer {token}".encode())
    assert principal.name == "a" and principal.scopes == {"recommend"}
    wrong = token[:-1] + ("A" if token[-1] != "A" else "B")
    for header, reason in ((None, "missing"), (b"Token abc", "malformed"),
                           (f"Bearer {wrong}".encode(), "invalid")):  # fmt: skip
        with pytest.raises(AuthError) as info:
            ring.authenticate(header)
        assert info.value.reason == reason
    revoke_key(path, name="a")
    assert ring.authenticate(f"Bearer {token}".encode()).name == "a"  # checked once a second
    clock[0] += 1.5
    with pytest.raises(AuthError):
        ring.authenticate(f"Bearer {token}".encode())
    _, other = create_key(path, "b", "admin")
    clock[0] += 1.5
    assert ring.authenticate(f"Bearer {other}".encode()).scopes == {"admin"}
    path.write_text("{broken")  # an invalid file: the previous keys stay in force
    clock[0] += 1.5
    assert ring.authenticate(f"Bearer {other}".encode()).name == "b"


# ------------------------------------------------------------------ parts without a server
def test_token_buckets_user_cap_and_in_flight() -> None:
    now = [100.0]
    buckets = TokenBuckets(clock=lambda: now[0])
    assert [buckets.take("k", 1.0, 2.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(1.0)]
    assert buckets.take("other", 1.0, 2.0) == 0.0  # per key
    now[0] += 0.5
    assert buckets.take("k", 1.0, 2.0) == pytest.approx(0.5)
    now[0] += 0.5
    assert buckets.take("k", 1.0, 2.0) == 0.0
    cap = UserEventCap(10, clock=lambda: now[0])
    now[0] = 600.0  # the start of a minute
    assert cap.admit("u", 6) == 0.0 and cap.admit("u", 4) == 0.0
    assert cap.admit("u", 1) == pytest.approx(60.0) and cap.admit("v", 10) == 0.0
    now[0] = 630.0
    assert cap.admit("u", 1) == pytest.approx(30.0)
    now[0] = 660.0  # the next minute
    assert cap.admit("u", 10) == 0.0
    gate = InFlight(2)
    assert gate.enter() and gate.enter() and not gate.enter()
    gate.leave()
    assert gate.enter()
    assert retry_after(0.01) == "1" and retry_after(2.2) == "3"


def test_strict_json_reader() -> None:
    assert parse_json(b'{"a": [1, {"b": 2}]}') == {"a": [1, {"b": 2}]}
    for body, kind in (
        (b'{"a": 1, "a": 2}', "duplicate_key"),
        (b'{"a": {"b": 1, "b": 1}}', "duplicate_key"),
        (b'{"a": NaN}', "json_invalid"),
        (b'{"a": Infinity}', "json_invalid"),
        (b"\xff\xfe{}", "json_invalid"),
        ('{"a": 1}'.encode("utf-16"), "json_invalid"),
        (b"[" * 100_000 + b"]" * 100_000, "json_invalid"),
        (b"1" * 5000, "json_invalid"),
    ):
        with pytest.raises(BodyError) as info:
            parse_json(body)
        assert info.value.detail[0]["type"] == kind, body[:20]
    request = validate(RecommendRequest, b'{"user_id": 7.0, "k": 3.0, "now": 5}')
    assert request.user_id == 7 and request.k == 3
    with pytest.raises(BodyError) as info:
        validate(
            EventsRequest, b'{"user_id": "u", "events": [{"item_id": "i\\u0000", "timestamp": 1}]}'
        )
    assert info.value.field == "events.0.item_id"
    assert "i\x00" not in str(info.value)  # the message names the field, not the value


def test_host_policy() -> None:
    policy = HostPolicy(("localhost", "127.0.0.1", "::1", "*.example.com"))
    for host in (b"localhost", b"localhost:3000", b"127.0.0.1:80", b"[::1]:3000", b"api.example.com",
                 b"LOCALHOST.", b"a.b.example.com:443"):  # fmt: skip
        assert policy.allows(host), host
    for host in (None, b"", b"evil.example", b"example.com", b"localhost.evil", b"[::2]:1",
                 b"127.0.0.1.nip.io"):  # fmt: skip
        assert not policy.allows(host), host
    assert HostPolicy(("*",)).allows(b"anything")


def test_log_filter_escapes_and_access_lines() -> None:
    record = logging.LogRecord(
        "bentoml.access", logging.INFO, __file__, 1, "path=%s", ("/a\nb\u2028c\x1b",), None
    )
    assert OneLineFilter().filter(record)
    assert record.getMessage() == "path=/a\\nb\\u2028c\\x1b"
    assert escape("x" * 10, 4) == "xxxx..."


def test_settings_from_the_environment() -> None:
    assert settings_from_env({}) == ServeSettings()
    settings = settings_from_env({"TLSAN_RATE_LIMIT": "5", "TLSAN_ALLOWED_HOSTS": "a.io, *.b.io",
                                  "TLSAN_INSECURE_NO_AUTH": "1"})  # fmt: skip
    assert settings.rate_limit == 5.0 and settings.burst == 10.0
    assert settings.hosts == ("a.io", "*.b.io") and settings.insecure_no_auth
    assert ServeSettings().hosts == ("localhost", "127.0.0.1", "::1")
    assert ServeSettings(api_keys_file=Path("k")).hosts == ("*",)
    for name, value in (("TLSAN_MAX_QUEUE", "0"), ("TLSAN_RATE_LIMIT", "nan"),
                        ("TLSAN_INSECURE_NO_AUTH", "maybe"), ("TLSAN_HEADER_TIMEOUT_S", "-1"),
                        ("TLSAN_ALLOWED_HOSTS", "a/b")):  # fmt: skip
        with pytest.raises(ConfigError, match=name):
            settings_from_env({name: value})
    check_bind("127.0.0.1", ServeSettings())
    check_bind("::1", ServeSettings())
    check_bind("0.0.0.0", ServeSettings(insecure_no_auth=True))
    check_bind("0.0.0.0", ServeSettings(api_keys_file=Path("k")))
    with pytest.raises(ConfigError, match="without API keys"):
        check_bind("10.1.2.3", ServeSettings())


def test_openapi_document_lists_every_answer() -> None:
    secured, open_ = build_openapi(auth=True), build_openapi(auth=False)
    post = secured["paths"]["/recommend"]["post"]
    assert {"200", "400", "401", "403", "413", "415", "429", "503", "504"} <= set(post["responses"])
    assert secured["paths"]["/events"]["post"]["responses"]["429"]["headers"]["Retry-After"][
        "required"
    ]
    assert "404" in secured["paths"]["/similar_items"]["post"]["responses"]
    assert {"401", "403"} <= set(secured["paths"]["/model"]["get"]["responses"])
    assert secured["paths"]["/healthz"]["get"]["security"] == []
    assert "401" not in open_["paths"]["/recommend"]["post"]["responses"]
    assert "429" in open_["paths"]["/events"]["post"]["responses"]  # the per-user cap
    schema = json.dumps(secured["components"]["schemas"])
    assert '"maximum": 9223372036854775807' in schema and '"type": "integer"' in schema
    error = secured["components"]["schemas"]["ErrorBody"]
    assert error["properties"]["detail"]["type"] == "array"


def test_a_bento_is_safe_by_default() -> None:
    """bentofile.yaml turns nothing off, and the service's own bind default is loopback."""
    import yaml

    from serving.service import TlsanService
    from tlsan.serve_settings import is_loopback

    bento = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    assert bento["service"] == "serving.service:TlsanService"
    envs = {e["name"]: str(e.get("value", "")) for e in bento.get("envs", [])}
    assert envs.get("TLSAN_INSECURE_NO_AUTH", "0") in ("", "0")
    assert "TLSAN_ALLOWED_HOSTS" not in envs and "BENTOML_HOST" not in envs
    assert is_loopback(str(TlsanService.config["http"]["host"]))
