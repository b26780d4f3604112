"""Realistic ERP traffic on the Northwind schema, for the demo and benchmarks.

New orders with their lines, stock and price changes, shipping, customer
address edits and deletes, each as its own ERP transaction.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

_CITIES = [
    ("Portland", "OR", "97201", "USA"),
    ("Berlin", None, "12209", "Germany"),
    ("Lyon", None, "69004", "France"),
    ("Seattle", "WA", "98101", "USA"),
    ("München", None, "80805", "Germany"),
    ("São Paulo", "SP", "05432-043", "Brazil"),
]
_ISO = {"USA": "US", "Germany": "DE", "France": "FR", "Brazil": "BR"}
_STREETS = [
    "Obere Str. 57",
    "12 Harbor Rd",
    "4 Mill St",
    "Rua Orós, 92",
    "9 Forge Ln",
    "Avda. de la Constitución 2222",
    "120 Hanover Sq.",
]


async def paced(
    step: Callable[[], Awaitable[object]],
    *,
    rate: float,
    duration: float,
    stop: asyncio.Event | None = None,
) -> None:
    """Call ``step`` ``rate`` times a second for ``duration`` seconds, or until stop."""
    started = time.monotonic()
    n = 0
    while time.monotonic() - started < duration and not (stop and stop.is_set()):
        await step()
        n += 1
        ahead = n / rate - (time.monotonic() - started)
        if ahead > 0:
            await asyncio.sleep(ahead)


@dataclass
class TrafficStats:
    transactions: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


class NorthwindTraffic:
    """Generate one business transaction at a time against a Northwind database."""

    def __init__(self, conn: asyncpg.Connection, *, seed: int = 7) -> None:
        self.conn = conn
        self.rng = random.Random(seed)
        self.stats = TrafficStats()
        self._next_order = 0
        self._customers: list[str] = []
        self._products: list[int] = []

    async def prepare(self) -> None:
        self._next_order = (
            int(await self.conn.fetchval("SELECT max(order_id) FROM orders")) + 1
        )
        self._customers = [
            r[0] for r in await self.conn.fetch("SELECT customer_id FROM customers")
        ]
        self._products = [
            r[0] for r in await self.conn.fetch("SELECT product_id FROM products")
        ]

    async def step(self) -> str:
        kind = self.rng.choices(
            [
                "order",
                "stock",
                "price",
                "ship",
                "address",
                "delete_line",
                "delete_order",
            ],
            weights=[30, 25, 10, 15, 10, 6, 4],
        )[0]
        async with self.conn.transaction():
            await getattr(self, f"_{kind}")()
        self.stats.transactions += 1
        self.stats.by_kind[kind] = self.stats.by_kind.get(kind, 0) + 1
        return kind

    async def run(
        self, *, rate: float, duration: float, stop: asyncio.Event | None = None
    ) -> None:
        """Run ``rate`` transactions a second for ``duration`` seconds."""
        await self.prepare()
        await paced(self.step, rate=rate, duration=duration, stop=stop)

    async def _order(self) -> None:
        order_id = self._next_order
        self._next_order += 1
        city, region, postal, country = self.rng.choice(_CITIES)
        await self.conn.execute(
            "INSERT INTO orders (order_id, customer_id, employee_id, order_date, "
            "required_date, ship_via, freight, ship_name, ship_address, ship_city, "
            "ship_region, ship_postal_code, ship_country) VALUES ($1, $2, $3, "
            "current_date, current_date + 14, $4, $5, $6, $7, $8, $9, $10, $11)",
            order_id,
            self.rng.choice(self._customers),
            self.rng.randint(1, 9),
            self.rng.randint(1, 3),
            round(self.rng.uniform(1, 300), 2),
            "Demo shipment",
            self.rng.choice(_STREETS),
            city,
            region,
            postal,
            country,
        )
        for product in self.rng.sample(self._products, self.rng.randint(1, 4)):
            await self.conn.execute(
                "INSERT INTO order_details (order_id, product_id, unit_price, "
                "quantity, discount) SELECT $1, product_id, unit_price, $2, $3 "
                "FROM products WHERE product_id = $4",
                order_id,
                self.rng.randint(1, 40),
                self.rng.choice([0.0, 0.05, 0.1]),
                product,
            )

    async def _stock(self) -> None:
        await self.conn.execute(
            "UPDATE products SET units_in_stock = greatest(0, units_in_stock + $1) "
            "WHERE product_id = $2",
            self.rng.randint(-10, 25),
            self.rng.choice(self._products),
        )

    async def _price(self) -> None:
        await self.conn.execute(
            "UPDATE products SET unit_price = round((unit_price * $1)::numeric, 2) "
            "WHERE product_id = $2",
            self.rng.choice([0.95, 1.05, 1.1]),
            self.rng.choice(self._products),
        )

    async def _ship(self) -> None:
        await self.conn.execute(
            "UPDATE orders SET shipped_date = current_date WHERE order_id = ("
            "SELECT order_id FROM orders WHERE shipped_date IS NULL "
            "ORDER BY order_id LIMIT 1)"
        )

    async def _address(self) -> None:
        city, region, postal, country = self.rng.choice(_CITIES)
        await self.conn.execute(
            "UPDATE customers SET address = $1, city = $2, region = $3, "
            "postal_code = $4, country = $5 WHERE customer_id = $6",
            self.rng.choice(_STREETS),
            city,
            region,
            postal,
            country,
            self.rng.choice(self._customers),
        )

    async def _delete_line(self) -> None:
        await self.conn.execute(
            "DELETE FROM order_details WHERE (order_id, product_id) = (SELECT "
            "order_id, product_id FROM order_details ORDER BY random() LIMIT 1)"
        )

    async def _delete_order(self) -> None:
        order_id = await self.conn.fetchval(
            "SELECT order_id FROM orders WHERE order_id >= 11000 "
            "ORDER BY random() LIMIT 1"
        )
        if order_id is not None:
            await self.conn.execute(
                "DELETE FROM order_details WHERE order_id = $1", order_id
            )
            await self.conn.execute("DELETE FROM orders WHERE order_id = $1", order_id)


_STAGES = [
    "Prospecting",
    "Qualification",
    "Needs Analysis",
    "Value Proposition",
    "Id. Decision Makers",
    "Perception Analysis",
    "Proposal/Price Quote",
    "Negotiation/Review",
    "Closed Won",
]
_ORDER_STATUS = [
    "Draft",
    "Submitted to Manufacturing",
    "Approved by Manufacturing",
    "In Production",
    "Out for delivery",
    "Delivered",
]
_CASE_SUBJECTS = [
    "Battery drains overnight",
    "Wrong frame colour delivered",
    "Front brake squeals",
    "Charger missing from box",
    "Invoice address wrong",
]


class OrgRest:
    """REST calls on the org as one of its users, never as the replicator.

    ``Sforce-Call-Options: client=<client>`` names someone else than the
    replicator's client, so the sync treats these writes as foreign changes.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        http: Any,
        *,
        api_version: str = "60.0",
        client: str = "demo-user",
    ) -> None:
        self.base_url = base_url
        self.url = f"{base_url}/services/data/v{api_version}"
        self.headers = {
            "Authorization": f"Bearer {token}",
            "Sforce-Call-Options": f"client={client}",
        }
        self.http = http

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        """Send one request; a status of 300 or more raises ``RuntimeError``."""
        async with self.http.request(
            method, self.url + path, json=body, headers=self.headers
        ) as resp:
            text = await resp.text()
            if resp.status >= 300:
                raise RuntimeError(f"{method} {path}: {resp.status} {text[:300]}")
            return await resp.json(content_type=None) if text else None

    async def query(self, soql: str) -> list[dict[str, Any]]:
        """Return every record of ``soql``, following ``nextRecordsUrl``."""
        async with self.http.get(
            self.url + "/query", params={"q": soql}, headers=self.headers
        ) as resp:
            if resp.status >= 300:
                raise RuntimeError(f"query {soql!r}: {resp.status} {await resp.text()}")
            body = await resp.json()
        records: list[dict[str, Any]] = body["records"]
        while not body.get("done", True) and body.get("nextRecordsUrl"):
            async with self.http.get(
                self.base_url + body["nextRecordsUrl"], headers=self.headers
            ) as resp:
                body = await resp.json()
            records += body["records"]
        return records

    async def create(self, obj: str, fields: dict[str, Any]) -> str:
        """Create an ``obj`` record and return its Id."""
        return str((await self.call("POST", f"/sobjects/{obj}", fields))["id"])

    async def update(self, obj: str, record_id: str, fields: dict[str, Any]) -> None:
        await self.call("PATCH", f"/sobjects/{obj}/{record_id}", fields)


class OrgTraffic:
    """Salesforce activity through REST, as the org's users would make it.

    Accounts edited, opportunities advancing and closing, cases opened,
    product prices and order statuses changed, all through ``org`` (a client
    that is not the replicator, so these are foreign changes).
    """

    def __init__(self, org: OrgRest, *, seed: int = 11) -> None:
        self.org = org
        self.rng = random.Random(seed)
        self.stats = TrafficStats()
        self._ids: dict[str, list[str]] = {}

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        return await self.org.call(method, path, body)

    async def prepare(self) -> None:
        for obj in ("Account", "Opportunity", "Product__c", "Order__c", "Case"):
            records = await self.org.query(f"SELECT Id FROM {obj}")
            self._ids[obj] = [r["Id"] for r in records]

    async def step(self) -> str:
        kind = self.rng.choices(
            ["account", "opportunity", "case", "product", "order"],
            weights=[30, 25, 15, 15, 15],
        )[0]
        await getattr(self, f"_{kind}")()
        self.stats.transactions += 1
        self.stats.by_kind[kind] = self.stats.by_kind.get(kind, 0) + 1
        return kind

    async def run(
        self, *, rate: float, duration: float, stop: asyncio.Event | None = None
    ) -> None:
        """Run ``rate`` transactions a second for ``duration`` seconds."""
        await self.prepare()
        await paced(self.step, rate=rate, duration=duration, stop=stop)

    async def _account(self) -> None:
        city, region, postal, country = self.rng.choice(_CITIES)
        if self.stats.transactions % 10 == 0:
            await self._refresh_linked()
        accounts = self._ids.get("linked")
        if not accounts:  # nothing linked to the ERP yet: edit a case instead
            await self._case()
            return
        await self._call(
            "PATCH",
            f"/sobjects/Account/{self.rng.choice(accounts)}",
            {
                "BillingStreet": self.rng.choice(_STREETS),
                "BillingCity": city,
                "BillingState": region,
                "BillingPostalCode": postal,
                "BillingCountry": _ISO.get(country, country),
                "Phone": f"555-{self.rng.randint(1000, 9999)}",
            },
        )

    async def _refresh_linked(self) -> None:
        """Accounts linked to the ERP (with an ERP id): the ones the sync touches."""
        records = await self.org.query(
            "SELECT Id FROM Account WHERE ERP_Customer_Id__c != null"
        )
        self._ids["linked"] = [r["Id"] for r in records]

    async def _opportunity(self) -> None:
        opp = self.rng.choice(self._ids["Opportunity"])
        current = await self._call(
            "GET", f"/sobjects/Opportunity/{opp}?fields=StageName"
        )
        stage = current.get("StageName")
        index = _STAGES.index(stage) if stage in _STAGES else 0
        new_stage = _STAGES[min(index + 1, len(_STAGES) - 1)]
        await self._call(
            "PATCH",
            f"/sobjects/Opportunity/{opp}",
            {"StageName": new_stage, "Amount": self.rng.randint(5, 200) * 500},
        )

    async def _case(self) -> None:
        record = await self._call(
            "POST",
            "/sobjects/Case",
            {
                "Subject": self.rng.choice(_CASE_SUBJECTS),
                "Status": "New",
                "Priority": self.rng.choice(["Low", "Medium", "High"]),
                "Origin": "Web",
                "AccountId": self.rng.choice(self._ids["Account"]),
            },
        )
        self._ids["Case"].append(record["id"])

    async def _product(self) -> None:
        await self._call(
            "PATCH",
            f"/sobjects/Product__c/{self.rng.choice(self._ids['Product__c'])}",
            {"MSRP__c": self.rng.randint(800, 9000)},
        )

    async def _order(self) -> None:
        await self._call(
            "PATCH",
            f"/sobjects/Order__c/{self.rng.choice(self._ids['Order__c'])}",
            {"Status__c": self.rng.choice(_ORDER_STATUS)},
        )
