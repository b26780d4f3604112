"""The field scenario of issue 5, step by step, against a running two-way sync.

Each step acts on one system as a user would (REST on the org, SQL on the
ERP) and polls the other system until the expected values show or a timeout
passes. Expected values come from the step's own input and the mapping's
rules (Northwind's spellings, the tie window and source precedence), never
from the unified tables; only the review list and the conflict log, which
are the outcome under test, are read from the replica. ``replicator demo``
runs it after its traffic phase, tests/test_demo_scenario.py on its own.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg

from replicator.mapping.config import SyncSettings
from replicator.traffic import OrgRest

__all__ = [
    "AMBIGUOUS",
    "LINKED",
    "ORDER_LINES",
    "FieldScenario",
    "StepResult",
    "parse_sf_datetime",
]

logger = logging.getLogger(__name__)

# Northwind customer -> the account seeded in the demo org that must be linked
# to it at switch-on (replicator/data/demo_org/data/Accounts.json): spelled and
# formatted differently, matched by name and postal code, by phone (FRANK) or
# already carrying the ERP id (BLAUS).
LINKED: dict[str, str] = {
    "ALFKI": "Alfreds Futterkiste GmbH",
    "AROUT": "Around The Horn Ltd.",
    "GREAL": "Great Lakes Food Market, Inc.",
    "LETSS": "Lets Stop N Shop",
    "BOTTM": "Bottom Dollar Markets",
    "FRANK": "Franken Versand",
    "BLAUS": "Blauer See Delikatessen KG",
}
# A Northwind customer two seeded accounts match equally well: review, no link.
AMBIGUOUS = ("WARTH", "Wartian Herkku")
# Lines of the order entered in Salesforce: ERP product id, unit price,
# quantity, discount (a fraction, as Northwind keeps it).
ORDER_LINES: tuple[tuple[int, Decimal, int, Decimal], ...] = (
    (3, Decimal("10.00"), 3, Decimal("0")),
    (4, Decimal("22.00"), 10, Decimal("0.05")),
)
# Products whose price and stock the ERP changes (3 is active, its price a
# float of the ERP's), and a discontinued one for IsActive.
_PRICED, _RESTOCKED, _DISCONTINUED = 3, 4, 5
# Where AROUT moves in Salesforce, and how Northwind spells it: US rows keep
# state codes in ``region`` and the country as "USA".
_SF_ADDRESS = {
    "BillingStreet": "1 Market St",
    "BillingCity": "San Diego",
    "BillingState": "CA",
    "BillingPostalCode": "92101",
    "BillingCountry": "US",
}
_ERP_ADDRESS = ("1 Market St", "San Diego", "CA", "92101", "USA")
# Where AROUT moves back in the ERP, and what Salesforce must show (ISO code).
_ERP_BACK = ("120 Hanover Sq.", "London", None, "WA1 1DP", "UK")
_SF_BACK = ("120 Hanover Sq.", "London", None, "WA1 1DP", "GB")
_POLL_SECONDS = 0.25


@dataclass(frozen=True, slots=True)
class StepResult:
    """The outcome of one step: passed or not, and what was seen."""

    name: str
    passed: bool
    detail: str
    seconds: float


class _Failed(Exception):
    """A step's expectation did not hold; the message says what was seen."""


def parse_sf_datetime(text: str) -> dt.datetime:
    """Parse Salesforce datetime text (``...Z`` or ``...+0000``) as aware UTC."""
    value = text.strip().replace("Z", "+00:00")
    if len(value) > 5 and value[-5] in "+-" and value[-3] != ":":
        value = value[:-2] + ":" + value[-2:]
    return dt.datetime.fromisoformat(value).astimezone(dt.UTC)


def _money(value: Any) -> Decimal | None:
    return None if value is None else Decimal(str(value)).quantize(Decimal("0.01"))


def _quote(values: Sequence[str]) -> str:
    return ", ".join("'" + v.replace("'", "\\'") + "'" for v in values)


class FieldScenario:
    """Run the scenario's steps against a sync that is running.

    ``erp`` is a plain ERP connection (a user's, not the sync's origin),
    ``replica`` the replica database, ``org`` a REST client that is not the
    replicator. ``sync`` holds the tie window and precedence that decide a
    simultaneous edit. Each step prints one line through ``say``.
    """

    def __init__(
        self,
        erp: asyncpg.Connection,
        replica: asyncpg.Connection,
        org: OrgRest,
        *,
        sync: SyncSettings | None = None,
        timeout: float = 30.0,
        say: Callable[[str], None] = print,
    ) -> None:
        self.erp = erp
        self.replica = replica
        self.org = org
        self.sync = sync or SyncSettings()
        self.timeout = timeout
        self.say = say
        self.order: tuple[str, int] | None = None  # Salesforce Id, ERP order_id

    async def run(self) -> list[StepResult]:
        """Run every step in order; a failed step does not stop the next."""
        steps: list[tuple[str, Callable[[], Awaitable[str]]]] = [
            ("(f) existing customers linked, ambiguous one in review", self.linking),
            ("(b) ERP stock and price reach Product2", self.stock_and_price),
            ("(b) Product2.IsActive follows discontinued", self.product_active),
            ("(a) Salesforce order reaches the ERP with lines", self.order_to_erp),
            ("(c) ERP shipped date reaches the Salesforce order", self.shipped_date),
            ("(d) Salesforce address reaches the ERP transformed", self.address_to_erp),
            ("(d) ERP address reaches Salesforce transformed", self.address_to_sf),
            ("(e) same field edited on both sides, resolved and logged", self.both),
        ]
        results = []
        for name, step in steps:
            results.append(await self._one(name, step))
        passed = sum(r.passed for r in results)
        self.say(f"field scenario: {passed} of {len(results)} steps passed")
        return results

    async def _one(self, name: str, step: Callable[[], Awaitable[str]]) -> StepResult:
        started = time.monotonic()
        try:
            detail, passed = await step(), True
        except _Failed as exc:
            detail, passed = str(exc), False
        except (asyncpg.PostgresError, RuntimeError, KeyError, ValueError) as exc:
            detail, passed = f"{type(exc).__name__}: {exc}", False
        result = StepResult(name, passed, detail, time.monotonic() - started)
        self.say(
            f"  {'PASS' if passed else 'FAIL'}  {name}: {detail} "
            f"({result.seconds:.1f}s)"
        )
        if not passed:
            logger.warning(
                "scenario step failed", extra={"step": name, "detail": detail}
            )
        return result

    async def _until(
        self, what: str, check: Callable[[], Awaitable[tuple[bool, Any]]]
    ) -> Any:
        """Poll ``check`` (ok, seen) until ok; fail with the last seen value."""
        seen: Any = None
        deadline = time.monotonic() + self.timeout
        while True:
            ok, seen = await check()
            if ok:
                return seen
            if time.monotonic() > deadline:
                raise _Failed(f"{what} not seen within {self.timeout:.0f}s; {seen}")
            await asyncio.sleep(_POLL_SECONDS)

    # -- shared look-ups ----------------------------------------------------------

    async def _account_of(self, code: str) -> str:
        """The Salesforce Id of the account linked to ERP customer ``code``.

        Found by its external id; failing that, through the link the sync
        holds (step (f) reports a link not written to Salesforce), so a step
        tests its own subject, not the linking again.
        """
        records = await self.org.query(
            f"SELECT Id FROM Account WHERE ERP_Customer_Id__c = '{code}'"
        )
        if len(records) == 1:
            return str(records[0]["Id"])
        linked = await self.replica.fetchval(
            "SELECT sf_id FROM unified.customer WHERE erp_key = $1", code
        )
        if len(records) > 1 or linked is None:
            raise _Failed(f"{len(records)} accounts carry ERP id {code!r}, not 1")
        return str(linked)

    async def _products(self, erp_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        records = await self.org.query(
            "SELECT Id, ERP_Product_Id__c, Unit_Price__c, Units_In_Stock__c, "
            "IsActive FROM Product2 WHERE ERP_Product_Id__c IN "
            f"({_quote([str(i) for i in erp_ids])})"
        )
        return {int(r["ERP_Product_Id__c"]): r for r in records}

    # -- (f) linking at switch-on -------------------------------------------------

    async def linking(self) -> str:
        async def check() -> tuple[bool, Any]:
            problems = await self._link_problems()
            return not problems, "; ".join(problems)

        await self._until("every seeded account linked once", check)
        return (
            f"{len(LINKED)} accounts linked to their customers, no duplicate on "
            f"either side; {AMBIGUOUS[0]} open in unified.match_review"
        )

    async def _link_problems(self) -> list[str]:
        accounts = await self.org.query(
            "SELECT Id, Name, ERP_Customer_Id__c FROM Account"
        )
        problems = []
        for code, name in LINKED.items():
            holders = [a["Name"] for a in accounts if a["ERP_Customer_Id__c"] == code]
            if holders != [name]:
                held = ", ".join(map(repr, holders)) or "no account"
                problems.append(f"ERP_Customer_Id__c {code} on {held}, want {name!r}")
        duplicates = await self.erp.fetch(
            "SELECT customer_id FROM customers WHERE company_name = ANY($1::text[]) "
            "AND customer_id <> ALL($2::text[])",
            [*LINKED.values(), AMBIGUOUS[1]],
            [*LINKED, AMBIGUOUS[0]],
        )
        if duplicates:
            problems.append(f"ERP customers created: {[r[0] for r in duplicates]}")
        return problems + await self._review_problems(accounts)

    async def _review_problems(self, accounts: list[dict[str, Any]]) -> list[str]:
        code, name = AMBIGUOUS
        twins = [a for a in accounts if str(a["Name"]).startswith(name)]
        problems = []
        if len(twins) != 2 or any(a["ERP_Customer_Id__c"] for a in twins):
            held = [(a["Name"], a["ERP_Customer_Id__c"]) for a in twins]
            problems.append(
                f"{name!r} accounts are {held}, want the 2 seeded, unlinked"
            )
        try:
            rows = await self.replica.fetch(
                "SELECT status, candidates::text AS candidates "
                "FROM unified.match_review "
                "WHERE entity = 'customer' AND record_key = $1",
                code,
            )
        except asyncpg.UndefinedTableError:
            return [*problems, "no table unified.match_review"]
        open_rows = [
            r
            for r in rows
            if r["status"] == "open" and all(a["Id"] in r["candidates"] for a in twins)
        ]
        if len(open_rows) != 1:
            problems.append(f"review rows of {code}: {[dict(r) for r in rows]}")
        return problems

    # -- (b) products ----------------------------------------------------------------

    async def stock_and_price(self) -> str:
        price = await self.erp.fetchval(
            "SELECT unit_price FROM products WHERE product_id = $1", _PRICED
        )
        new_price = (
            Decimal("10.45") if _money(price) != Decimal("10.45") else Decimal("11.05")
        )
        async with self.erp.transaction():
            priced_stock = await self.erp.fetchval(
                "UPDATE products SET unit_price = $2, "
                "units_in_stock = units_in_stock + 17 "
                "WHERE product_id = $1 RETURNING units_in_stock",
                _PRICED,
                float(new_price),
            )
            restocked = await self.erp.fetchval(
                "UPDATE products SET units_in_stock = units_in_stock + 5 "
                "WHERE product_id = $1 RETURNING units_in_stock",
                _RESTOCKED,
            )
        want = {_PRICED: (new_price, priced_stock), _RESTOCKED: (None, restocked)}

        async def check() -> tuple[bool, Any]:
            found = await self._products(list(want))
            seen = {
                i: (_money(r["Unit_Price__c"]), r["Units_In_Stock__c"])
                for i, r in found.items()
            }
            ok = len(seen) == len(want) and all(
                seen[i][1] == stock and (p is None or seen[i][0] == p)
                for i, (p, stock) in want.items()
            )
            return ok, f"Product2 (price, stock) by ERP id: {seen}, want {want}"

        await self._until("new price and stock in Salesforce", check)
        return (
            f"product {_PRICED} at {new_price} with {priced_stock} in stock, "
            f"product {_RESTOCKED} {restocked} in stock"
        )

    async def product_active(self) -> str:
        rows = await self.erp.fetch(
            "SELECT product_id, discontinued FROM products "
            "WHERE product_id = ANY($1::smallint[])",
            [_PRICED, _DISCONTINUED],
        )
        want = {r["product_id"]: r["discontinued"] == 0 for r in rows}

        async def check() -> tuple[bool, Any]:
            found = await self._products(list(want))
            seen = {i: r["IsActive"] for i, r in found.items()}
            return seen == want, f"IsActive by ERP id {seen}, want {want}"

        await self._until("IsActive = not discontinued", check)
        return f"IsActive by ERP id {want}, as discontinued says"

    # -- (a) an order entered in Salesforce -------------------------------------------

    async def order_to_erp(self) -> str:
        account = await self._account_of("ALFKI")
        products = await self._products([line[0] for line in ORDER_LINES])
        if len(products) != len(ORDER_LINES):
            raise _Failed(f"Product2 of the lines' products missing: {products}")
        entries = await self._price_entries(products)
        marker = f"Field order {uuid.uuid4().hex[:8]}"
        today = dt.datetime.now(dt.UTC).date()
        order_sf = await self.org.create(
            "Order",
            {
                "AccountId": account,
                "EffectiveDate": today.isoformat(),
                "Status": "Draft",
                "Pricebook2Id": entries["pricebook"],
                "Ship_Name__c": marker,
                "ShippingStreet": "Obere Str. 57",
                "ShippingCity": "Berlin",
                "ShippingPostalCode": "12209",
                "ShippingCountry": "DE",
                "Freight__c": 12.5,
            },
        )
        for product, price, quantity, discount in ORDER_LINES:
            await self.org.create(
                "OrderItem",
                {
                    "OrderId": order_sf,
                    "PricebookEntryId": entries[str(product)],
                    "Product2Id": products[product]["Id"],
                    "UnitPrice": float(price),
                    "Quantity": quantity,
                    "Discount__c": float(discount),
                },
            )
        order_id = await self._until_order_in_erp(marker, today)
        self.order = (order_sf, order_id)
        await self._until_order_linked(order_sf, order_id)
        await self._until_lines_in_erp(order_id)
        return (
            f"ERP order {order_id} for ALFKI with {len(ORDER_LINES)} lines; "
            f"ERP_Order_Id__c = {order_id}"
        )

    async def _price_entries(self, products: Mapping[int, Any]) -> dict[str, str]:
        """The standard price book and an active entry for each product."""
        books = await self.org.query(
            "SELECT Id FROM Pricebook2 WHERE IsStandard = true"
        )
        if not books:
            raise _Failed("the org has no standard price book")
        book = str(books[0]["Id"])
        entries = {"pricebook": book}
        for product, price, _, _ in ORDER_LINES:
            product_id = products[product]["Id"]
            found = await self.org.query(
                f"SELECT Id FROM PricebookEntry WHERE Pricebook2Id = '{book}' "
                f"AND Product2Id = '{product_id}'"
            )
            entries[str(product)] = (
                str(found[0]["Id"])
                if found
                else await self.org.create(
                    "PricebookEntry",
                    {
                        "Pricebook2Id": book,
                        "Product2Id": product_id,
                        "UnitPrice": float(price),
                        "IsActive": True,
                    },
                )
            )
        return entries

    async def _until_order_in_erp(self, marker: str, today: dt.date) -> int:
        want = ("ALFKI", today, Decimal("12.50"), "Berlin", "12209", "Germany")

        async def check() -> tuple[bool, Any]:
            row = await self.erp.fetchrow(
                "SELECT order_id, customer_id, order_date, freight, ship_city, "
                "ship_postal_code, ship_country FROM orders WHERE ship_name = $1",
                marker,
            )
            if row is None:
                return False, f"no ERP order with ship_name {marker!r}"
            seen = (*row[1:3], _money(row["freight"]), *row[4:])
            return seen == want, f"ERP order {tuple(seen)}, want {want}"

        await self._until("the order in the ERP", check)
        order_id = await self.erp.fetchval(
            "SELECT order_id FROM orders WHERE ship_name = $1", marker
        )
        return int(order_id)

    async def _until_lines_in_erp(self, order_id: int) -> None:
        want = [(p, price, q, d) for p, price, q, d in ORDER_LINES]

        async def check() -> tuple[bool, Any]:
            rows = await self.erp.fetch(
                "SELECT product_id, unit_price, quantity, discount FROM order_details "
                "WHERE order_id = $1 ORDER BY product_id",
                order_id,
            )
            seen = [(r[0], _money(r[1]), r[2], _money(r[3])) for r in rows]
            return seen == want, f"lines {seen}, want {want}"

        await self._until("the order's lines in the ERP", check)

    async def _until_order_linked(self, order_sf: str, order_id: int) -> None:
        async def check() -> tuple[bool, Any]:
            record = await self.org.call(
                "GET", f"/sobjects/Order/{order_sf}?fields=ERP_Order_Id__c"
            )
            seen = record.get("ERP_Order_Id__c")
            return seen == str(order_id), f"ERP_Order_Id__c = {seen!r}"

        await self._until("the ERP key written back to the order", check)

    # -- (c) shipped date ------------------------------------------------------------

    async def shipped_date(self) -> str:
        order_sf, order_id = self.order or await self._linked_unshipped_order()
        shipped = await self.erp.fetchval(
            "UPDATE orders SET shipped_date = current_date WHERE order_id = $1 "
            "RETURNING shipped_date",
            order_id,
        )
        want = dt.datetime.combine(shipped, dt.time(0), tzinfo=dt.UTC)

        async def check() -> tuple[bool, Any]:
            record = await self.org.call(
                "GET", f"/sobjects/Order/{order_sf}?fields=Shipped_Date__c"
            )
            seen = record.get("Shipped_Date__c")
            ok = seen is not None and parse_sf_datetime(seen) == want
            return ok, f"Shipped_Date__c {seen!r}"

        await self._until(f"order {order_id} shipped {want:%Y-%m-%dT%H:%MZ}", check)
        return (
            f"ERP order {order_id} shipped {shipped}: "
            f"Shipped_Date__c {want:%Y-%m-%dT%H:%MZ}"
        )

    async def _linked_unshipped_order(self) -> tuple[str, int]:
        """Without the order of step (a): an unshipped order both systems hold."""
        records = await self.org.query(
            "SELECT Id, ERP_Order_Id__c FROM Order "
            "WHERE ERP_Order_Id__c != null AND Shipped_Date__c = null"
        )
        linked = {int(r["ERP_Order_Id__c"]): str(r["Id"]) for r in records}
        order_id = await self.erp.fetchval(
            "SELECT min(order_id) FROM orders WHERE shipped_date IS NULL "
            "AND order_id = ANY($1::int[])",
            list(linked),
        )
        if order_id is None:
            raise _Failed("no unshipped order is linked in both systems")
        return linked[order_id], int(order_id)

    # -- (d) addresses ---------------------------------------------------------------

    async def address_to_erp(self) -> str:
        account = await self._account_of("AROUT")
        await self.org.update("Account", account, dict(_SF_ADDRESS))

        async def check() -> tuple[bool, Any]:
            row = await self.erp.fetchrow(
                "SELECT address, city, region, postal_code, country FROM customers "
                "WHERE customer_id = 'AROUT'"
            )
            seen = tuple(row) if row else None
            return seen == _ERP_ADDRESS, f"ERP {seen}, want {_ERP_ADDRESS}"

        await self._until("the new address in the ERP", check)
        return "BillingState CA, BillingCountry US -> region 'CA', country 'USA'"

    async def address_to_sf(self) -> str:
        account = await self._account_of("AROUT")
        await self.erp.execute(
            "UPDATE customers SET address = $1, city = $2, region = $3, "
            "postal_code = $4, country = $5 WHERE customer_id = 'AROUT'",
            *_ERP_BACK,
        )
        fields = (
            "BillingStreet,BillingCity,BillingState,BillingPostalCode,BillingCountry"
        )

        async def check() -> tuple[bool, Any]:
            record = await self.org.call(
                "GET", f"/sobjects/Account/{account}?fields={fields}"
            )
            seen = tuple(record.get(f) for f in fields.split(","))
            return seen == _SF_BACK, f"Salesforce {seen}, want {_SF_BACK}"

        await self._until("the ERP's address in Salesforce", check)
        return "country 'UK', region NULL -> BillingCountry GB, BillingState empty"

    # -- (e) the same field edited on both sides ---------------------------------------

    async def both(self) -> str:
        account = await self._account_of("GREAL")
        suffix = uuid.uuid4().int % 9000 + 1000
        values = {"erp": f"(503) 555-{suffix}", "salesforce": f"503-555-{suffix + 1}"}
        started, ended = await self._edit_both(account, values)
        window = self.sync.tie_window_seconds
        if math.floor(started / window) != math.floor(ended / window):
            raise _Failed("the two edits straddled a tie-window bucket; run again")
        # one bucket: the fixed source precedence decides (docs/two-way-sync.md)
        winner, loser = self.sync.precedence
        await self._until_phone(account, values[winner])
        await self._until_logged(values[winner], winner, values[loser], loser)
        return (
            f"{winner} kept {values[winner]!r}, {loser}'s {values[loser]!r} logged "
            "as a conflict (rule lww)"
        )

    async def _edit_both(
        self, account: str, values: dict[str, str]
    ) -> tuple[float, float]:
        """Edit the phone on both sides at once, early in a tie-window bucket."""
        window = self.sync.tie_window_seconds
        into = time.time() % window
        await asyncio.sleep((window - into + 0.05 * window) % window)
        started = time.time()
        await asyncio.gather(
            self.erp.execute(
                "UPDATE customers SET phone = $1 WHERE customer_id = 'GREAL'",
                values["erp"],
            ),
            self.org.update("Account", account, {"Phone": values["salesforce"]}),
        )
        return started, time.time()

    async def _until_phone(self, account: str, want: str) -> None:
        async def check() -> tuple[bool, Any]:
            erp = await self.erp.fetchval(
                "SELECT phone FROM customers WHERE customer_id = 'GREAL'"
            )
            record = await self.org.call(
                "GET", f"/sobjects/Account/{account}?fields=Phone"
            )
            seen = (erp, record.get("Phone"))
            return seen == (want, want), f"(ERP, Salesforce) phone {seen}"

        await self._until(f"phone {want!r} on both sides", check)

    async def _until_logged(
        self, kept: str, kept_source: str, discarded: str, discarded_source: str
    ) -> None:
        async def check() -> tuple[bool, Any]:
            rows = await self.replica.fetch(
                "SELECT kept_value, kept_source, discarded_source, rule "
                "FROM replicator.conflicts WHERE entity = 'customer' "
                "AND field = 'phone' AND discarded_value = $1",
                discarded,
            )
            seen = [tuple(r) for r in rows]
            return (kept, kept_source, discarded_source, "lww") in seen, (
                f"conflicts discarding {discarded!r}: {seen}"
            )

        await self._until("the discarded phone in replicator.conflicts", check)
