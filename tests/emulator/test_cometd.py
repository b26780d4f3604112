"""Raw Bayeux against the served emulator: every reply and error of reference section 2."""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.emulator._streaming_org import ServedOrg, StreamingConfig, serve_org

pytestmark = pytest.mark.integration

ACCOUNTS = "/data/AccountChangeEvent"
REPLAY_INVALID = (
    "400::The replayId {{{}}} you provided was invalid. Please provide a valid ID, "
    "-2 to replay all events, or -1 to replay only new events."
)


class Bayeux:
    """A bare long-polling client: one message list per POST, replies as parsed."""

    def __init__(self, http: aiohttp.ClientSession, url: str, auth: str | None) -> None:
        self.http = http
        self.url = url
        self.auth = auth
        self.client_id = ""
        self._ids = itertools.count(1)

    async def post(self, *messages: dict[str, Any]) -> list[dict[str, Any]]:
        headers = {"Authorization": self.auth} if self.auth else {}
        for message in messages:
            message.setdefault("id", str(next(self._ids)))
        async with self.http.post(self.url, json=list(messages), headers=headers) as r:
            assert r.status == 200, await r.text()
            body: list[dict[str, Any]] = await r.json()
            return body

    async def handshake(self) -> dict[str, Any]:
        (reply,) = await self.post(
            {
                "channel": "/meta/handshake",
                "version": "1.0",
                "supportedConnectionTypes": ["long-polling"],
            }
        )
        self.client_id = reply.get("clientId", "")
        return reply

    async def connect(self) -> list[dict[str, Any]]:
        return await self.post(
            {
                "channel": "/meta/connect",
                "clientId": self.client_id,
                "connectionType": "long-polling",
            }
        )

    async def subscribe(self, channel: str, replay: Any = None) -> dict[str, Any]:
        message: dict[str, Any] = {
            "channel": "/meta/subscribe",
            "clientId": self.client_id,
            "subscription": channel,
        }
        if replay is not None:
            message["ext"] = {"replay": replay}
        (reply,) = await self.post(message)
        return reply

    async def open(self, channel: str = ACCOUNTS, replay: Any = None) -> None:
        await self.handshake()
        await self.connect()
        reply = await self.subscribe(channel, replay)
        assert reply["successful"], reply


@pytest.fixture(scope="module")
async def org() -> AsyncIterator[ServedOrg]:
    async with serve_org(StreamingConfig(long_poll_timeout_seconds=0.5)) as served:
        yield served


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def client(org: ServedOrg, http: aiohttp.ClientSession) -> Bayeux:
    return Bayeux(http, org.url + "/cometd/60.0", "Bearer " + org.token())


@pytest.fixture(autouse=True)
def _reset_faults(org: ServedOrg) -> None:
    org.streaming.faults.reset()


def _events(replies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in replies if not r["channel"].startswith("/meta/")]


async def test_handshake_reply_has_replay_ext_and_no_advice(client: Bayeux) -> None:
    reply = await client.handshake()

    assert reply["successful"] is True
    assert reply["ext"] == {"replay": True, "payload.format": True}
    assert reply["supportedConnectionTypes"] == ["long-polling"]
    assert reply["version"] == "1.0"
    assert "advice" not in reply
    assert re.fullmatch(r"[a-z0-9]{26,29}", reply["clientId"])


async def test_first_connect_returns_at_once_with_advice_later_ones_are_held(
    client: Bayeux,
) -> None:
    await client.handshake()
    loop = asyncio.get_running_loop()

    started = loop.time()
    (first,) = await client.connect()
    first_took = loop.time() - started
    started = loop.time()
    (second,) = await client.connect()
    second_took = loop.time() - started

    assert first["advice"] == {"interval": 0, "timeout": 500, "reconnect": "retry"}
    assert first_took < 0.3
    assert second["successful"] is True
    assert "advice" not in second
    assert second_took >= 0.45


async def test_held_connect_returns_events_then_the_connect_reply(
    org: ServedOrg, client: Bayeux
) -> None:
    await client.open()
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, lambda: org.write("Account", {"Name": "A"}, origin="acme"))

    replies = await client.connect()

    assert [r["channel"] for r in replies] == [ACCOUNTS, "/meta/connect"]
    data = replies[0]["data"]
    assert set(data) == {"schema", "payload", "event"}
    assert isinstance(data["event"]["replayId"], int)
    header = data["payload"]["ChangeEventHeader"]
    assert header["changeType"] == "CREATE"
    assert header["changeOrigin"] == "com/salesforce/api/rest/60.0;client=acme"


async def test_events_are_batched_up_to_the_configured_cap(
    org: ServedOrg, client: Bayeux
) -> None:
    org.streaming.faults.configure(max_events_per_response=3)
    await client.open(replay=None)
    for n in range(5):
        org.write("Account", {"Name": f"n{n}"})

    first = _events(await client.connect())
    second = _events(await client.connect())

    assert len(first) == 3
    assert len(second) == 2
    ids = [e["data"]["event"]["replayId"] for e in first + second]
    assert ids == sorted(ids)


async def test_replay_all_then_from_a_stored_id(org: ServedOrg, client: Bayeux) -> None:
    for n in range(3):
        org.write("Account", {"Name": f"r{n}"})
    last = org.streaming.log.last_id

    await client.open(replay={ACCOUNTS: -2})
    everything = _events(await client.connect())
    other = Bayeux(client.http, client.url, client.auth)
    await other.open(replay={ACCOUNTS: last - 1})
    after = _events(await other.connect())

    assert everything[-1]["data"]["event"]["replayId"] == last
    assert [e["data"]["event"]["replayId"] for e in after] == [last]


async def test_change_events_channel_carries_every_object(
    org: ServedOrg, client: Bayeux
) -> None:
    await client.open("/data/ChangeEvents")
    org.write("Account", {"Name": "x"})
    org.write("Contact", {"LastName": "y"})

    events = _events(await client.connect())

    assert [
        e["data"]["payload"]["ChangeEventHeader"]["entityName"] for e in events
    ] == [
        "Account",
        "Contact",
    ]
    assert {e["channel"] for e in events} == {"/data/ChangeEvents"}


async def test_unsubscribe_stops_delivery(org: ServedOrg, client: Bayeux) -> None:
    await client.open()
    (reply,) = await client.post(
        {
            "channel": "/meta/unsubscribe",
            "clientId": client.client_id,
            "subscription": ACCOUNTS,
        }
    )
    org.write("Account", {"Name": "x"})

    replies = await client.connect()

    assert reply["successful"] is True
    assert reply["subscription"] == ACCOUNTS
    assert _events(replies) == []


async def test_no_authorization_header_reply_has_no_channel_and_no_id(
    org: ServedOrg, http: aiohttp.ClientSession
) -> None:
    client = Bayeux(http, org.url + "/cometd/60.0", None)

    reply = await client.handshake()

    assert reply == {
        "error": "401::Request requires authentication",
        "successful": False,
    }


@pytest.mark.parametrize("scheme", ["Bearer ", "OAuth ", ""])
async def test_authorization_accepted_in_bearer_oauth_and_bare_forms(
    org: ServedOrg, http: aiohttp.ClientSession, scheme: str
) -> None:
    client = Bayeux(http, org.url + "/cometd/60.0", scheme + org.token())

    reply = await client.handshake()

    assert reply["successful"] is True


async def test_handshake_with_bad_token_is_denied_with_reason_in_ext(
    org: ServedOrg, http: aiohttp.ClientSession
) -> None:
    client = Bayeux(http, org.url + "/cometd/60.0", "Bearer not-a-token")

    reply = await client.handshake()

    assert reply["error"] == "403::Handshake denied"
    assert reply["successful"] is False
    assert reply["advice"] == {"reconnect": "none"}
    assert reply["ext"]["sfdc"] == {"failureReason": "401::Authentication invalid"}


async def test_denied_handshakes_give_the_configured_failure_reason(
    org: ServedOrg, client: Bayeux
) -> None:
    org.streaming.faults.deny_handshakes(
        "403::Organization concurrent user limit exceeded"
    )

    reply = await client.handshake()

    assert reply["error"] == "403::Handshake denied"
    assert reply["ext"]["sfdc"]["failureReason"] == (
        "403::Organization concurrent user limit exceeded"
    )


async def test_revoked_token_fails_the_next_connect(
    org: ServedOrg, client: Bayeux
) -> None:
    await client.open()
    assert client.auth is not None
    org.tokens.revoke(client.auth.split()[1])

    (reply,) = await client.connect()

    assert reply["error"] == "401::Authentication invalid"
    assert reply["advice"] == {"reconnect": "none", "interval": 0}
    assert reply["clientId"] == client.client_id
    assert reply["successful"] is False


async def test_unknown_client_reply_has_handshake_advice_and_no_client_id(
    client: Bayeux,
) -> None:
    client.client_id = "nosuchclient0000000000000"

    (reply,) = await client.connect()

    assert reply["error"] == "403::Unknown client"
    assert reply["advice"] == {"interval": 0, "reconnect": "handshake"}
    assert "clientId" not in reply
    assert reply["channel"] == "/meta/connect"


async def test_unknown_client_variant_with_reconnect_none(
    org: ServedOrg, client: Bayeux
) -> None:
    org.streaming.faults.configure(unknown_client_advice="none")
    client.client_id = "nosuchclient0000000000000"

    (reply,) = await client.connect()

    assert reply["advice"] == {"interval": 0, "reconnect": "none"}
    assert reply["clientId"] == "nosuchclient0000000000000"


async def test_forgotten_clients_get_unknown_client_on_their_held_connect(
    org: ServedOrg, client: Bayeux
) -> None:
    await client.open()
    asyncio.get_running_loop().call_later(0.05, org.streaming.faults.forget_clients)

    (reply,) = await client.connect()

    assert reply["error"] == "403::Unknown client"


async def test_dropped_connections_cut_held_long_polls(
    org: ServedOrg, client: Bayeux
) -> None:
    await client.open()
    asyncio.get_running_loop().call_later(0.05, org.streaming.faults.drop_connections)

    with pytest.raises(aiohttp.ClientError):
        await client.connect()
    replies = await client.connect()

    assert replies[-1]["successful"] is True


async def test_client_silent_past_max_interval_is_forgotten(
    org: ServedOrg, client: Bayeux
) -> None:
    org.streaming.faults.configure(max_interval=0.1)
    await client.open()
    await asyncio.sleep(0.2)

    (reply,) = await client.connect()

    assert reply["error"] == "403::Unknown client"


async def test_disconnect_ends_the_session(client: Bayeux) -> None:
    await client.open()

    (reply,) = await client.post(
        {"channel": "/meta/disconnect", "clientId": client.client_id}
    )
    (after,) = await client.connect()

    assert reply["successful"] is True
    assert after["error"] == "403::Unknown client"


@pytest.mark.parametrize(
    ("subscription", "error"),
    [
        (None, "400::Channel name not specified"),
        (
            "data/AccountChangeEvent",
            "400::Channel subscriptions must start with a leading '/'",
        ),
        (
            "/topic/AccountUpdates",
            "400::The channel you requested to subscribe to does not exist "
            "{/topic/AccountUpdates}",
        ),
        (
            "/data/Note__ChangeEvent",
            "400::The channel you requested to subscribe to does not exist "
            "{/data/Note__ChangeEvent}",
        ),
    ],
)
async def test_subscribe_to_a_bad_channel_names_it(
    client: Bayeux, subscription: str | None, error: str
) -> None:
    await client.handshake()

    reply = await client.subscribe(subscription)  # type: ignore[arg-type]

    assert reply["error"] == error
    assert reply["successful"] is False
    assert reply["clientId"] == client.client_id


async def test_subscribe_with_replay_id_never_issued_is_invalid(client: Bayeux) -> None:
    await client.handshake()

    reply = await client.subscribe(ACCOUNTS, {ACCOUNTS: 987654321})

    assert reply["error"] == REPLAY_INVALID.format(987654321)
    assert reply["subscription"] == ACCOUNTS


async def test_subscribe_with_replay_map_lacking_the_channel(client: Bayeux) -> None:
    await client.handshake()

    reply = await client.subscribe(ACCOUNTS, {"/data/ContactChangeEvent": -1})

    assert reply["error"] == (
        "400::The replayId for channel {/data/AccountChangeEvent} wasn't found using "
        "the provided replay ID map {{/data/ContactChangeEvent=-1}}. Ensure that the "
        "channel name you provided in the replay map is valid and matches the channel "
        "name used for subscribing."
    )


async def test_cdc_channels_do_not_exist_before_api_44(
    org: ServedOrg, client: Bayeux
) -> None:
    client.url = org.url + "/cometd/43.0"
    await client.handshake()

    reply = await client.subscribe(ACCOUNTS)

    assert reply["error"].startswith("400::The channel you requested to subscribe to")


async def test_replay_id_past_retention_is_invalid() -> None:
    config = StreamingConfig(
        replay_retention_seconds=0.2, long_poll_timeout_seconds=0.3
    )
    async with serve_org(config) as org, aiohttp.ClientSession() as http:
        org.write("Account", {"Name": "old"})
        stale = org.streaming.log.last_id
        await asyncio.sleep(0.3)
        org.write("Account", {"Name": "new"})
        client = Bayeux(http, org.url + "/cometd/60.0", "Bearer " + org.token())
        await client.handshake()

        stale_reply = await client.subscribe(ACCOUNTS, {ACCOUNTS: stale - 1})
        all_reply = await client.subscribe(ACCOUNTS, {ACCOUNTS: -2})
        events = _events(await client.connect())

    assert stale_reply["error"] == REPLAY_INVALID.format(stale - 1)
    assert all_reply["successful"] is True
    assert [
        e["data"]["payload"]["ChangeEventHeader"]["changeType"] for e in events
    ] == ["CREATE"]
    assert events[0]["data"]["event"]["replayId"] == stale + 1


@pytest.mark.parametrize(
    ("path", "status", "text"),
    [
        (
            "/cometd",
            400,
            "API version in the URI is mandatory. URI format: '/cometd/68.0'",
        ),
        (
            "/cometd/36.0",
            400,
            "Unsupported API version. Only API versions '37.0' and later are supported.",
        ),
    ],
)
async def test_bad_endpoint_version_is_http_400(
    org: ServedOrg, http: aiohttp.ClientSession, path: str, status: int, text: str
) -> None:
    async with http.post(org.url + path, json=[{"channel": "/meta/handshake"}]) as r:
        assert (r.status, await r.text()) == (status, text)


async def test_request_over_32k_is_http_413(
    org: ServedOrg, http: aiohttp.ClientSession
) -> None:
    body = [{"channel": "/meta/handshake", "padding": "x" * 33_000}]

    async with http.post(org.url + "/cometd/60.0", json=body) as r:
        assert (r.status, await r.text()) == (413, "Maximum Request Size Exceeded")


async def test_connect_with_other_connection_type_is_refused(client: Bayeux) -> None:
    await client.handshake()

    (reply,) = await client.post(
        {
            "channel": "/meta/connect",
            "clientId": client.client_id,
            "connectionType": "websocket",
        }
    )

    assert reply["error"] == "400::Invalid connection type {websocket}"


async def test_bare_object_body_is_accepted_unless_strict(
    org: ServedOrg, http: aiohttp.ClientSession
) -> None:
    headers = {"Authorization": "Bearer " + org.token()}
    message = {"channel": "/meta/handshake", "version": "1.0", "id": "1"}

    async with http.post(org.url + "/cometd/60.0", json=message, headers=headers) as r:
        lenient = r.status
    org.streaming.faults.configure(strict_array_body=True)
    async with http.post(org.url + "/cometd/60.0", json=message, headers=headers) as r:
        strict = r.status

    assert (lenient, strict) == (200, 400)


async def test_gap_fault_sends_header_only_events_for_chosen_records(
    org: ServedOrg, client: Bayeux
) -> None:
    record_id = org.write("Account", {"Name": "gappy"})
    org.streaming.faults.gap_for([record_id])
    await client.open()

    org.update(record_id, {"Phone": "1"})
    other = org.write("Account", {"Name": "fine"})
    events = _events(await client.connect())

    headers = [e["data"]["payload"]["ChangeEventHeader"] for e in events]
    assert [(h["changeType"], h["recordIds"]) for h in headers] == [
        ("GAP_UPDATE", [record_id]),
        ("CREATE", [other]),
    ]
    assert set(events[0]["data"]["payload"]) == {"ChangeEventHeader"}


async def test_gap_fault_for_next_changes(org: ServedOrg, client: Bayeux) -> None:
    await client.open()
    org.streaming.faults.gap_next_changes(1)

    org.write("Account", {"Name": "a"})
    org.write("Account", {"Name": "b"})
    events = _events(await client.connect())

    assert [
        e["data"]["payload"]["ChangeEventHeader"]["changeType"] for e in events
    ] == [
        "GAP_CREATE",
        "CREATE",
    ]


async def test_overflow_fault_ends_large_transaction_with_gap_overflow(
    org: ServedOrg, client: Bayeux
) -> None:
    await client.open("/data/ChangeEvents")
    org.streaming.faults.set_overflow_threshold(2)

    with org.state.transaction(user_id="005000000000001AAA") as tx:
        for n in range(4):
            tx.create("Account", {"Name": f"bulk{n}"})
        tx.create("Contact", {"LastName": "bulk"})
    events = _events(await client.connect())

    headers = [e["data"]["payload"]["ChangeEventHeader"] for e in events]
    assert [(h["entityName"], h["changeType"]) for h in headers] == [
        ("Account", "CREATE"),
        ("Account", "CREATE"),
        ("Account", "GAP_OVERFLOW"),
        ("Contact", "GAP_OVERFLOW"),
    ]
    assert len({h["transactionKey"] for h in headers}) == 1


async def test_automation_fault_sets_field_in_the_same_event(
    org: ServedOrg, client: Bayeux
) -> None:
    """A flow that rates every written account lands in the writer's own event."""
    org.streaming.faults.add_automation("Account", {"Rating": "Hot"})
    await client.open()

    org.write("Account", {"Name": "flowed"}, origin="ERPSync")
    events = _events(await client.connect())

    (event,) = events
    payload = event["data"]["payload"]
    assert payload["Rating"] == "Hot"
    assert payload["ChangeEventHeader"]["changeOrigin"].endswith(";client=ERPSync")


async def test_control_routes_drive_the_same_faults(
    org: ServedOrg, http: aiohttp.ClientSession
) -> None:
    base = org.url + "/__emulator__/streaming"

    async with http.post(base + "/gap", json={"next": 2}) as r:
        gap = await r.json()
    async with http.post(base + "/overflow", json={"threshold": 7}) as r:
        overflow = await r.json()
    async with http.post(base + "/restart") as r:
        restarted = await r.json()
    async with http.post(base + "/reset") as r:
        reset = await r.json()

    assert gap["gapNext"] == 2
    assert overflow["overflowThreshold"] == 7
    assert restarted == {"restarted": True}
    assert (reset["gapNext"], reset["overflowThreshold"]) == (0, 100_000)


async def test_subscribe_with_a_backlog_answers_the_held_connect_at_once(
    org: ServedOrg, client: Bayeux
) -> None:
    """A resubscription from an older replay id is served without waiting a poll."""
    org.streaming.faults.configure(long_poll_timeout=30.0)
    org.write("Account", {"Name": "backlog"})
    last = org.streaming.log.last_id
    await client.open("/data/ContactChangeEvent")
    held = asyncio.create_task(client.connect())
    await asyncio.sleep(0.1)

    other = Bayeux(client.http, client.url, client.auth)
    other.client_id = client.client_id
    reply = await other.subscribe(ACCOUNTS, {ACCOUNTS: last - 1})
    async with asyncio.timeout(5):
        events = _events(await held)

    assert reply["successful"]
    assert [e["data"]["event"]["replayId"] for e in events] == [last]
