"""The BentoML service over HTTP: real servers on free local ports, with the SQLite store (via
`tlsan serve`, two workers) and with a real redis-server (via `bentoml serve`).

One server per backend for the whole module (starting one takes seconds); every endpoint,
cold start, filters, explain, bad input, events changing the next answer, train/serve parity
for every Digital_Music test user, and durability of acknowledged events under SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import polars as pl
import pytest

from feature_store import Event, open_store
from tests.servers import BentoServer, bento_server, redis_server
from tests.test_recommender import offline_top10
from tlsan.bundle import Bundle, load_bundle
from tlsan.cli import main

pytestmark = pytest.mark.slow
DAY = 86_400


@dataclass
class Deployment:
    """A bundle and what the online store should hold for it (the parity construction)."""

    data: Path
    bundle: Bundle
    rows: tuple[list[str], list[str], list[int]]  # users, items, timestamps (raw ids)
    test: pl.DataFrame  # test examples with raw user ids
    work: Path

    def load_store(self, url: str) -> None:
        with open_store(url) as store:
            store.bulk_load(*self.rows)


@pytest.fixture(scope="module")
def deployment(
    dm_bundle: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Deployment:
    data, bundle = dm_bundle
    work = tmp_path_factory.mktemp("service")
    users = dict(pl.read_parquet(data / "vocab/users.parquet").rows())
    items = dict(pl.read_parquet(data / "vocab/items.parquet").select("index", "item_id").rows())
    test = pl.read_parquet(data / "examples/test.parquet")
    history = (
        pl.read_parquet(data / "events.parquet")
        .join(test.select("user", "history_end"), on="user")
        .filter(pl.col("pos") < pl.col("history_end"))
        .select("user", "item", "timestamp")
    )
    short = (
        test.select(
            "user", pl.col("short_items").alias("item"), pl.col("ref_time").alias("timestamp")
        )
        .explode("item")
        .drop_nulls("item")
    )
    rows = pl.concat([history, short])
    return Deployment(
        data=data,
        bundle=load_bundle(bundle),
        rows=(
            [users[u] for u in rows["user"].to_list()],
            [items[i] for i in rows["item"].to_list()],
            rows["timestamp"].to_list(),
        ),
        test=test.with_columns(pl.col("user").replace_strict(users).alias("user_id")),
        work=work,
    )


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def server(request: pytest.FixtureRequest, deployment: Deployment) -> Iterator[BentoServer]:
    """The service on a free port: SQLite via `tlsan serve --workers 2`, Redis via `bentoml serve`."""
    bundle = str(deployment.bundle.path)
    if request.param == "sqlite":
        url = f"sqlite:///{deployment.work / 'store.db'}"
        deployment.load_store(url)
        command = [sys.executable, "-m", "tlsan", "serve", "--bundle", bundle, "--store", url,
                   "--port", "{port}", "--workers", "2"]  # fmt: skip
        with bento_server(command) as srv:
            yield srv
        return
    with redis_server() as redis:
        deployment.load_store(redis.url(2))
        command = [sys.executable, "-m", "bentoml", "serve", "serving.service:TlsanService",
                   "--host", "127.0.0.1", "--port", "{port}"]  # fmt: skip
        env = {"TLSAN_BUNDLE": bundle, "TLSAN_STORE": redis.url(2)}
        with bento_server(command, env=env) as srv:
            yield srv


def post(server: BentoServer, path: str, body: object) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{server.url}{path}", content=content, headers={"content-type": "application/json"}
    )


# ------------------------------------------------------------------ endpoints
def test_model_health_metrics_and_openapi(server: BentoServer, deployment: Deployment) -> None:
    manifest = deployment.bundle.manifest
    model = httpx.get(f"{server.url}/model")
    assert model.status_code == 200
    info = model.json()
    assert info["model_version"] == manifest["model_version"]
    assert info["dataset_hash"] == manifest["dataset_hash"]
    assert info["metrics"] == manifest["metrics"] and "ndcg@10" in info["metrics"]["test"]
    # which model serves, on what, and how it scored on validation (test: reported only)
    assert info["model_kind"] == "tlsan" and info["recipe"]["loss"] == "ce"
    valid = manifest["metrics"]["valid"]
    assert info["validation"] == {
        "select_metric": "ndcg@10",
        "ndcg@10": valid["ndcg@10"],
        "hr@10": valid["hr@10"],
    }
    assert info["test"]["ndcg@10"] == manifest["metrics"]["test"]["ndcg@10"]
    assert info["runtime"]["onnx"] is True and "onnxruntime" in info["runtime"]["engine"]
    assert info["index"]["kind"] == "flat"
    # no path on the server: not the bundle's, not its folder's
    assert str(deployment.bundle.path.parent) not in model.text
    for path in ("/healthz", "/readyz", "/livez"):
        assert httpx.get(f"{server.url}{path}").status_code == 200, path
    post(server, "/recommend", {"user_id": "metrics-probe"})
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'endpoint="/recommend"' in metrics
    assert httpx.get(f"{server.url}/").status_code == 200
    spec = httpx.get(f"{server.url}/docs.json").json()
    assert {"/recommend", "/events", "/similar_items", "/model"} <= set(spec["paths"])
    # without keys no route answers 401/403, and the document says so
    assert "401" not in spec["paths"]["/recommend"]["post"]["responses"]


def test_test_users_get_the_offline_top10_over_http(
    server: BentoServer, deployment: Deployment, request: pytest.FixtureRequest
) -> None:
    """Every test user through the SQLite deployment, every 4th through Redis (the store is
    the only difference; tests/test_recommender.py covers every user without HTTP)."""
    stride = 1 if request.node.callspec.params["server"] == "sqlite" else 4
    expected = offline_top10(deployment.data, deployment.bundle)[0][::stride]
    item_ids = [""] + deployment.bundle.items["item_id"].to_list()
    bodies = [
        {"user_id": user, "k": 10, "now": now}
        for user, now in deployment.test.select("user_id", "ref_time").iter_rows()
    ][::stride]

    async def fetch_all() -> list[dict[str, object]]:
        limits = httpx.Limits(max_connections=8)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as client:
            semaphore = asyncio.Semaphore(8)

            async def one(body: dict[str, object]) -> dict[str, object]:
                async with semaphore:
                    response = await client.post("/recommend", json=body)
                    assert response.status_code == 200, response.text
                    return response.json()

            return await asyncio.gather(*(one(b) for b in bodies))

    answers = asyncio.run(fetch_all())
    assert len(answers) == len(range(0, 1_659, stride))
    mismatched = [
        row
        for row, answer in enumerate(answers)
        if [i["item_id"] for i in answer["items"]] != [item_ids[i] for i in expected[row]]
    ]
    assert mismatched == []
    assert {a["strategy"] for a in answers} == {"model"}


def test_cold_start_filters_and_explain(server: BentoServer, deployment: Deployment) -> None:
    pop = deployment.bundle.popularity
    item_ids = [""] + deployment.bundle.items["item_id"].to_list()
    categories = deployment.bundle.categories["category"].to_list()
    cold = post(server, "/recommend", {"user_id": "brand-new", "k": 5}).json()
    assert cold["strategy"] == "popularity" and "explanation" not in cold
    assert [i["item_id"] for i in cold["items"]] == [item_ids[i] for i in pop["index"].head(5)]
    wanted = [categories[2], categories[7]]
    filtered = post(
        server, "/recommend", {"user_id": 12345, "k": 8, "categories": wanted}
    ).json()  # an integer id is the same raw id as "12345"
    assert filtered["user_id"] == "12345" and filtered["strategy"] == "popularity_category"
    assert len(filtered["items"]) == 8 and {i["category"] for i in filtered["items"]} <= set(wanted)

    row = deployment.test.filter(pl.col("short_items").list.len() > 0).row(0, named=True)
    body = {"user_id": row["user_id"], "k": 10, "now": row["ref_time"], "explain": True}
    explained = post(server, "/recommend", body).json()
    assert explained["strategy"] == "model"
    exp = explained["explanation"]
    assert len(exp["short_term"]) == len(row["short_items"])
    assert len(exp["long_term"]) == min(10, len(row["long_items"]))
    assert sum(e["weight"] for e in exp["long_term"]) == pytest.approx(1.0, abs=1e-4)
    body["categories"] = wanted
    in_cats = post(server, "/recommend", body).json()
    assert len(in_cats["items"]) == 10 and {i["category"] for i in in_cats["items"]} <= set(wanted)

    neutral = post(
        server,
        "/recommend",
        {"user_id": "visitor", "events": [{"item_id": item_ids[3], "timestamp": 1_000},
                                          {"item_id": "not-in-catalog", "timestamp": 1_001}],
         "now": 2_000},
    ).json()  # fmt: skip
    assert neutral["strategy"] == "model_neutral_user"
    assert neutral["unknown_items"] == ["not-in-catalog"]
    assert item_ids[3] not in [i["item_id"] for i in neutral["items"]]

    similar = post(server, "/similar_items", {"item_id": item_ids[3], "k": 4}).json()
    assert len(similar["items"]) == 4 and item_ids[3] not in [
        i["item_id"] for i in similar["items"]
    ]


def test_posted_events_shape_the_next_recommendation(
    server: BentoServer, deployment: Deployment
) -> None:
    row = deployment.test.filter(pl.col("short_items").list.len() == 0).row(5, named=True)
    user, now = f"{row['user_id']}-copy-{server.port}", row["ref_time"] + DAY + 3_600
    item_ids = [""] + deployment.bundle.items["item_id"].to_list()
    first = post(server, "/recommend", {"user_id": user, "now": now, "explain": True}).json()
    assert first["strategy"] == "popularity"  # nothing stored for this user yet
    clicks = [{"item_id": item_ids[i], "timestamp": now - 600 + i} for i in (11, 12)]
    stored = post(server, "/events", {"user_id": user, "events": clicks})
    assert stored.status_code == 200
    assert stored.json() == {"user_id": user, "received": 2, "stored": 2, "unknown_items": []}
    # Idempotent: the same events again store nothing new.
    again = post(server, "/events", {"user_id": user, "events": clicks}).json()
    assert again["stored"] == 0
    second = post(server, "/recommend", {"user_id": user, "now": now, "explain": True}).json()
    assert second["strategy"] == "model_neutral_user"
    assert [e["item_id"] for e in second["explanation"]["short_term"]] == [
        item_ids[11],
        item_ids[12],
    ]
    assert not {item_ids[11], item_ids[12]} & {i["item_id"] for i in second["items"]}
    # A day later the same clicks are yesterday's session: long-term, not short-term.
    later = post(server, "/recommend", {"user_id": user, "now": now + DAY, "explain": True}).json()
    assert later["explanation"]["short_term"] == []
    assert [e["item_id"] for e in later["explanation"]["long_term"]] == [item_ids[11], item_ids[12]]
    assert later["items"] != second["items"]


# ------------------------------------------------------------------ bad input
BAD_INPUT = [
    ("/recommend", b"{not json", 400, "json_invalid"),
    ("/recommend", b"[1, 2]", 400, "model_type"),
    ("/recommend", {"k": 5}, 400, "user_id"),
    ("/recommend", {"user_id": "u", "k": "10"}, 400, "k"),
    ("/recommend", {"user_id": "u", "k": 0}, 400, "k"),
    ("/recommend", {"user_id": "u", "k": 1001}, 400, "k"),
    ("/recommend", {"user_id": True}, 400, "user_id"),
    ("/recommend", {"user_id": ""}, 400, "user_id"),
    ("/recommend", {"user_id": "u", "now": 1.5}, 400, "now"),
    ("/recommend", {"user_id": "u", "now": 10**30}, 400, "now"),
    ("/recommend", {"user_id": "u", "exclude_seen": "yes"}, 400, "exclude_seen"),
    ("/recommend", {"user_id": "u", "categories": []}, 400, "categories"),
    ("/recommend", {"user_id": "u", "categories": ["no-such"]}, 400, "categories"),
    ("/recommend", {"user_id": "u", "userid": "typo"}, 400, "userid"),
    ("/recommend", {"user_id": "u", "events": [{"item_id": "i"}]}, 400, "timestamp"),
    (
        "/recommend",
        {"user_id": "u", "events": [{"item_id": "i", "timestamp": "x"}]},
        400,
        "timestamp",
    ),
    (
        "/recommend",
        {"user_id": "u", "events": [{"item_id": "i", "timestamp": t} for t in range(501)]},
        400,
        "events",
    ),
    ("/events", {"user_id": "u", "events": []}, 400, "events"),
    ("/events", {"user_id": "u"}, 400, "events"),
    ("/similar_items", {"item_id": "no-such-item"}, 404, "item_id"),
    ("/similar_items", {"item_id": "1", "k": -1}, 400, "k"),
    ("/recommend", b'{"user_id": "' + b"x" * 2_000_000 + b'"}', 413, "body"),
    ("/recommend", b'{"user_id": ' + b"9" * 5_000 + b"}", 400, "json_invalid"),
    ("/recommend", b"null", 400, "model_type"),
    ("/recommend", b'"user"', 400, "model_type"),
    ("/recommend", b'{"user_id": "\xff\xfe"}', 400, "json_invalid"),
    (
        "/recommend",
        {"user_id": "u", "events": [{"item_id": 2**63, "timestamp": 0}]},
        400,
        "item_id",
    ),
    ("/recommend", {"user_id": "a\nb"}, 400, "user_id"),
    ("/recommend", {"user_id": "x" * 257}, 400, "user_id"),
    ("/recommend", b'{"user_id": "a", "user_id": "b"}', 400, "duplicate_key"),
    ("/recommend", b'{"user_id": "a", "k": NaN}', 400, "json_invalid"),
    (
        "/events",
        {"user_id": "u", "events": [{"item_id": "i", "timestamp": t} for t in range(501)]},
        400,
        "events",
    ),
]


def test_bad_input_gets_a_4xx_json_body_naming_the_field(server: BentoServer) -> None:
    for path, body, status, field in BAD_INPUT:
        response = post(server, path, body)
        assert response.status_code == status, (path, body if len(str(body)) < 200 else "...")
        data = response.json()
        text = json.dumps(data)
        assert field in text, (field, text[:300])
        assert "error" in data
    multipart = httpx.post(f"{server.url}/recommend", files={"user_id": b"u"})
    assert multipart.status_code == 415

    def chunked(body: bytes, size: int = 65_536) -> Iterator[bytes]:
        """No Content-Length: the guard counts the bytes as they stream in."""
        yield from (body[i : i + size] for i in range(0, len(body), size))

    huge = b'{"user_id": "' + b"x" * 2_000_000 + b'"}'
    streamed = httpx.post(
        f"{server.url}/recommend",
        content=chunked(huge),
        headers={"content-type": "application/json"},
    )
    assert streamed.status_code == 413 and "body" in json.dumps(streamed.json())
    small = httpx.post(
        f"{server.url}/recommend",
        content=chunked(b'{"user_id": "u", "k": 3}'),
        headers={"content-type": "application/json"},
    )
    assert small.status_code == 200 and len(small.json()["items"]) == 3
    # Only JSON, declared once: text/plain (a cross-site form can send it), curl's default
    # form type, no type, or two Content-Type headers are refused before the body is read.
    for headers in (
        [("content-type", "text/plain")],
        [("content-type", "application/x-www-form-urlencoded")],
        [],
        [("content-type", "application/json"), ("content-type", "text/plain")],
    ):
        refused = httpx.post(
            f"{server.url}/recommend", content=b'{"user_id": "u", "k": 2}', headers=headers
        )
        assert refused.status_code == 415, headers
        assert refused.json()["detail"][0]["loc"] == ["header", "content-type"]
    # Integral numbers are integers (JSON Schema's reading): k 2.0 is k 2.
    assert len(post(server, "/recommend", {"user_id": "u", "k": 2.0}).json()["items"]) == 2
    # The largest int64 id is an id; the Host header must be a loopback name (no keys).
    assert post(server, "/recommend", {"user_id": 2**63 - 1}).status_code == 200
    rebound = httpx.get(f"{server.url}/readyz", headers={"host": "evil.example"})
    assert rebound.status_code == 200  # health probes answer any Host
    evil = httpx.post(
        f"{server.url}/recommend",
        json={"user_id": "u"},
        headers={"host": "evil.example", "origin": "http://evil.example"},
    )
    assert evil.status_code == 400 and evil.json()["detail"][0]["loc"] == ["header", "host"]
    assert httpx.get(f"{server.url}/recommend").status_code == 405
    # The server is still fine afterwards.
    assert post(server, "/recommend", {"user_id": "still-alive"}).status_code == 200


# ------------------------------------------------------------------ the CLI and durability
def test_serve_refuses_bad_bundles_and_stores_before_starting(
    deployment: Deployment,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert main(["serve", "--bundle", str(tmp_path / "missing")]) == 2
    assert "expected a bundle from `tlsan export`" in capsys.readouterr().err
    bundle = str(deployment.bundle.path)
    assert main(["serve", "--bundle", bundle, "--store", "mysql://db"]) == 2
    assert "unknown scheme 'mysql'" in capsys.readouterr().err
    assert main(["serve", "--bundle", bundle, "--workers", "0"]) == 2
    capsys.readouterr()
    # Registry sources are resolved before any worker starts, too.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    assert main(["serve", "--bundle", "models:/tlsan@champion"]) == 2
    assert "no such registered model version" in capsys.readouterr().err
    assert main(["serve", "--bundle", "bentoml:tlsan"]) == 2
    assert "not in the BentoML model store" in capsys.readouterr().err


def test_acknowledged_events_survive_killing_the_server(
    deployment: Deployment, tmp_path: Path
) -> None:
    """Four writers in flight on two workers when the whole server is SIGKILLed: every
    event the server acknowledged is in the store afterwards (and nothing that was not sent)."""
    url = f"sqlite:///{tmp_path / 'durable.db'}"
    command = [sys.executable, "-m", "tlsan", "serve", "--bundle", str(deployment.bundle.path),
               "--store", url, "--port", "{port}", "--workers", "2"]  # fmt: skip
    item_ids = deployment.bundle.items["item_id"].to_list()
    acknowledged: dict[str, list[Event]] = {f"durable-{w}": [] for w in range(4)}
    sent: dict[str, list[Event]] = {user: [] for user in acknowledged}
    stop = threading.Event()

    def writer(user: str, srv: BentoServer) -> None:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            for n in range(300):
                if stop.is_set():
                    return
                event = Event(item_ids[n % len(item_ids)], 1_700_000_000 + n)
                sent[user].append(event)
                body = {"user_id": user, "events": [{"item_id": event.item_id, "timestamp": event.timestamp}]}  # fmt: skip
                try:
                    response = client.post("/events", json=body)
                except httpx.HTTPError:
                    return  # the server is gone
                if response.status_code == 200 and response.json()["stored"] == 1:
                    acknowledged[user].append(event)

    with bento_server(command) as srv:
        threads = [threading.Thread(target=writer, args=(u, srv)) for u in acknowledged]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 120
        while sum(map(len, acknowledged.values())) < 80 and time.monotonic() < deadline:
            time.sleep(0.05)
        srv.kill()  # SIGKILL the launcher, the arbiter and the workers at once, writers in flight
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        assert all(not p.is_running() for p in srv.processes())
    assert sum(map(len, acknowledged.values())) >= 80
    with open_store(url) as store:
        for user, events in acknowledged.items():
            stored = store.recent(user)
            assert set(events) <= set(stored), user
            assert set(stored) <= set(sent[user]), user
