"""Built-in standard objects an integration between a CRM and an ERP touches.

Account, Contact, Lead, Opportunity, Product2, Pricebook2, PricebookEntry,
Order, OrderItem, Case and User with their common fields: real API names,
types, lengths, key prefixes, compound Name and address fields and the
system fields. Field lists are a working subset of what describe shows on a
Developer Edition org, not the whole.
"""

from __future__ import annotations

from typing import Any

from replicator.emulator.schema import FieldSchema, ObjectSchema, OrgSchema

__all__ = ["STANDARD_PREFIXES", "standard_schema", "system_fields"]

STANDARD_PREFIXES = {
    "Account": "001",
    "Contact": "003",
    "User": "005",
    "Opportunity": "006",
    "Lead": "00Q",
    "Product2": "01t",
    "Pricebook2": "01s",
    "PricebookEntry": "01u",
    "Case": "500",
    "Order": "801",
    "OrderItem": "802",
}

_READ_ONLY: dict[str, Any] = {"createable": False, "updateable": False}

_INDUSTRIES = (
    "Agriculture", "Apparel", "Banking", "Biotechnology", "Chemicals",
    "Communications", "Construction", "Consulting", "Education", "Electronics",
    "Energy", "Engineering", "Entertainment", "Environmental", "Finance",
    "Food & Beverage", "Government", "Healthcare", "Hospitality", "Insurance",
    "Machinery", "Media", "Not For Profit", "Recreation", "Retail", "Shipping",
    "Technology", "Telecommunications", "Transportation", "Utilities", "Other",
)  # fmt: skip
_LEAD_SOURCES = ("Web", "Phone Inquiry", "Partner Referral", "Purchased List", "Other")
_STAGES = (
    "Prospecting", "Qualification", "Needs Analysis", "Value Proposition",
    "Id. Decision Makers", "Perception Analysis", "Proposal/Price Quote",
    "Negotiation/Review", "Closed Won", "Closed Lost",
)  # fmt: skip
_GEOCODE_ACCURACY = (
    "Address", "NearAddress", "Block", "Street", "ExtendedZip", "Zip",
    "Neighborhood", "City", "County", "State", "Unknown",
)  # fmt: skip


def _text(name: str, label: str, length: int = 255, **kw: object) -> FieldSchema:
    return FieldSchema(
        name,
        "string",
        label=label,
        length=length,
        **kw,  # type: ignore[arg-type]
    )


def _long_text(name: str, label: str, length: int = 32000) -> FieldSchema:
    return FieldSchema(
        name, "textarea", label=label, length=length, extra_type_info="plaintextarea"
    )


def _typed(name: str, type_: str, label: str, **kw: object) -> FieldSchema:
    return FieldSchema(name, type_, label=label, **kw)  # type: ignore[arg-type]


def _ref(
    name: str,
    label: str,
    to: str | tuple[str, ...],
    relationship: str,
    **kw: object,
) -> FieldSchema:
    targets = (to,) if isinstance(to, str) else to
    return FieldSchema(
        name,
        "reference",
        label=label,
        length=18,
        reference_to=targets,
        relationship_name=relationship,
        **kw,  # type: ignore[arg-type]
    )


def _picklist(
    name: str,
    label: str,
    values: tuple[str, ...],
    *,
    restricted: bool = False,
    default: str | None = None,
    **kw: object,
) -> FieldSchema:
    return FieldSchema(
        name,
        "picklist",
        label=label,
        length=255,
        picklist_values=values,
        restricted_picklist=restricted,
        default_value=default,
        **kw,  # type: ignore[arg-type]
    )


def _head() -> list[FieldSchema]:
    return [
        FieldSchema(
            "Id", "id", label="Record ID", length=18, nillable=False, **_READ_ONLY
        ),
        _typed("IsDeleted", "boolean", "Deleted", nillable=False, **_READ_ONLY),
    ]


def _system(owner: bool = True) -> list[FieldSchema]:
    fields = []
    if owner:
        fields.append(_ref("OwnerId", "Owner ID", "User", "Owner", nillable=False))
    fields += [
        _typed("CreatedDate", "datetime", "Created Date", nillable=False, **_READ_ONLY),
        _ref(
            "CreatedById",
            "Created By ID",
            "User",
            "CreatedBy",
            nillable=False,
            **_READ_ONLY,
        ),
        _typed(
            "LastModifiedDate",
            "datetime",
            "Last Modified Date",
            nillable=False,
            **_READ_ONLY,
        ),
        _ref(
            "LastModifiedById",
            "Last Modified By ID",
            "User",
            "LastModifiedBy",
            nillable=False,
            **_READ_ONLY,
        ),
        _typed(
            "SystemModstamp",
            "datetime",
            "System Modstamp",
            nillable=False,
            **_READ_ONLY,
        ),
    ]
    return fields


def _address(prefix: str, label: str) -> list[FieldSchema]:
    """Return the components of ``<prefix>Address`` and the compound itself."""
    compound = f"{prefix}Address"
    part: dict[str, Any] = {"compound_field_name": compound}

    def lab(suffix: str) -> str:
        return f"{label} {suffix}".strip()

    return [
        FieldSchema(
            f"{prefix}Street", "textarea", label=lab("Street"), length=255, **part
        ),
        _text(f"{prefix}City", lab("City"), 40, **part),
        _text(f"{prefix}State", lab("State/Province"), 80, **part),
        _text(f"{prefix}PostalCode", lab("Zip/Postal Code"), 20, **part),
        _text(f"{prefix}Country", lab("Country"), 80, **part),
        _typed(
            f"{prefix}Latitude",
            "double",
            lab("Latitude"),
            precision=18,
            scale=15,
            **part,
        ),
        _typed(
            f"{prefix}Longitude",
            "double",
            lab("Longitude"),
            precision=18,
            scale=15,
            **part,
        ),
        _picklist(
            f"{prefix}GeocodeAccuracy",
            lab("Geocode Accuracy"),
            _GEOCODE_ACCURACY,
            restricted=True,
            **part,
        ),
        _typed(compound, "address", lab("Address"), **_READ_ONLY),
    ]


def _person_name(last_required: bool = True) -> list[FieldSchema]:
    part: dict[str, Any] = {"compound_field_name": "Name"}
    return [
        _text("LastName", "Last Name", 80, nillable=not last_required, **part),
        _text("FirstName", "First Name", 40, **part),
        _picklist(
            "Salutation", "Salutation", ("Mr.", "Ms.", "Mrs.", "Dr.", "Prof."), **part
        ),
        _text("Name", "Full Name", 121, **_READ_ONLY),
    ]


def _object(
    name: str, label: str, plural: str, fields: list[FieldSchema]
) -> ObjectSchema:
    return ObjectSchema(
        name=name,
        key_prefix=STANDARD_PREFIXES[name],
        label=label,
        label_plural=plural,
        fields={f.name: f for f in fields},
    )


def _account() -> ObjectSchema:
    return _object(
        "Account",
        "Account",
        "Accounts",
        [
            *_head(),
            _ref(
                "MasterRecordId",
                "Master Record ID",
                "Account",
                "MasterRecord",
                **_READ_ONLY,
            ),
            _text("Name", "Account Name", 255, nillable=False),
            _picklist(
                "Type",
                "Account Type",
                (
                    "Prospect",
                    "Customer - Direct",
                    "Customer - Channel",
                    "Channel Partner / Reseller",
                    "Installation Partner",
                    "Technology Partner",
                    "Other",
                ),
            ),
            _ref(
                "ParentId",
                "Parent Account ID",
                "Account",
                "Parent",
                child_relationship_name="ChildAccounts",
            ),
            *_address("Billing", "Billing"),
            *_address("Shipping", "Shipping"),
            _typed("Phone", "phone", "Account Phone", length=40),
            _typed("Fax", "phone", "Account Fax", length=40),
            _text("AccountNumber", "Account Number", 40),
            _typed("Website", "url", "Website", length=255),
            _text("Sic", "SIC Code", 20),
            _picklist("Industry", "Industry", _INDUSTRIES),
            _typed(
                "AnnualRevenue", "currency", "Annual Revenue", precision=18, scale=0
            ),
            _typed("NumberOfEmployees", "int", "Employees", precision=8),
            _picklist(
                "Ownership", "Ownership", ("Public", "Private", "Subsidiary", "Other")
            ),
            _text("TickerSymbol", "Ticker Symbol", 20),
            _long_text("Description", "Account Description"),
            _picklist("Rating", "Account Rating", ("Hot", "Warm", "Cold")),
            _text("Site", "Account Site", 80),
            _picklist("AccountSource", "Account Source", _LEAD_SOURCES),
            *_system(),
        ],
    )


def _contact() -> ObjectSchema:
    return _object(
        "Contact",
        "Contact",
        "Contacts",
        [
            *_head(),
            _ref(
                "AccountId",
                "Account ID",
                "Account",
                "Account",
                child_relationship_name="Contacts",
            ),
            *_person_name(),
            *_address("Mailing", "Mailing"),
            _typed("Phone", "phone", "Business Phone", length=40),
            _typed("MobilePhone", "phone", "Mobile Phone", length=40),
            _typed("Email", "email", "Email", length=80),
            _text("Title", "Title", 128),
            _text("Department", "Department", 80),
            _typed("Birthdate", "date", "Birthdate"),
            _ref("ReportsToId", "Reports To ID", "Contact", "ReportsTo"),
            _picklist("LeadSource", "Lead Source", _LEAD_SOURCES),
            _long_text("Description", "Contact Description"),
            *_system(),
        ],
    )


def _lead() -> ObjectSchema:
    return _object(
        "Lead",
        "Lead",
        "Leads",
        [
            *_head(),
            *_person_name(),
            _text("Title", "Title", 128),
            _text("Company", "Company", 255, nillable=False),
            *_address("", ""),
            _typed("Phone", "phone", "Phone", length=40),
            _typed("Email", "email", "Email", length=80),
            _typed("Website", "url", "Website", length=255),
            _long_text("Description", "Description"),
            _picklist("LeadSource", "Lead Source", _LEAD_SOURCES),
            _picklist(
                "Status",
                "Status",
                (
                    "Open - Not Contacted",
                    "Working - Contacted",
                    "Closed - Converted",
                    "Closed - Not Converted",
                ),
                restricted=True,
                default="Open - Not Contacted",
                nillable=False,
            ),
            _picklist("Industry", "Industry", _INDUSTRIES),
            _picklist("Rating", "Rating", ("Hot", "Warm", "Cold")),
            _typed(
                "AnnualRevenue", "currency", "Annual Revenue", precision=18, scale=0
            ),
            _typed("NumberOfEmployees", "int", "Employees", precision=8),
            _typed("IsConverted", "boolean", "Converted", nillable=False),
            _ref(
                "ConvertedAccountId",
                "Converted Account ID",
                "Account",
                "ConvertedAccount",
                **_READ_ONLY,
            ),
            _ref(
                "ConvertedContactId",
                "Converted Contact ID",
                "Contact",
                "ConvertedContact",
                **_READ_ONLY,
            ),
            *_system(),
        ],
    )


def _opportunity() -> ObjectSchema:
    return _object(
        "Opportunity",
        "Opportunity",
        "Opportunities",
        [
            *_head(),
            _ref(
                "AccountId",
                "Account ID",
                "Account",
                "Account",
                child_relationship_name="Opportunities",
            ),
            _text("Name", "Name", 120, nillable=False),
            _long_text("Description", "Description"),
            _picklist("StageName", "Stage", _STAGES, restricted=True, nillable=False),
            _typed("Amount", "currency", "Amount", precision=18, scale=2),
            _typed("Probability", "percent", "Probability (%)", precision=3, scale=0),
            _typed(
                "ExpectedRevenue",
                "currency",
                "Expected Amount",
                precision=18,
                scale=2,
                calculated=True,
                formula="Amount * Probability / 100",
                **_READ_ONLY,
            ),
            _typed("CloseDate", "date", "Close Date", nillable=False),
            _picklist(
                "Type",
                "Opportunity Type",
                (
                    "Existing Customer - Upgrade",
                    "Existing Customer - Replacement",
                    "Existing Customer - Downgrade",
                    "New Customer",
                ),
            ),
            _text("NextStep", "Next Step", 255),
            _picklist("LeadSource", "Lead Source", _LEAD_SOURCES),
            _typed("IsClosed", "boolean", "Closed", nillable=False, **_READ_ONLY),
            _typed("IsWon", "boolean", "Won", nillable=False, **_READ_ONLY),
            _picklist(
                "ForecastCategoryName",
                "Forecast Category",
                ("Omitted", "Pipeline", "BestCase", "Commit", "Closed"),
            ),
            _ref("Pricebook2Id", "Price Book ID", "Pricebook2", "Pricebook2"),
            *_system(),
        ],
    )


def _product() -> ObjectSchema:
    return _object(
        "Product2",
        "Product",
        "Products",
        [
            *_head(),
            _text("Name", "Product Name", 255, nillable=False),
            _text("ProductCode", "Product Code", 255),
            _typed("Description", "textarea", "Product Description", length=4000),
            _typed("IsActive", "boolean", "Active", nillable=False),
            _picklist(
                "Family", "Product Family", ("None", "Bikes", "Accessories", "Services")
            ),
            _text("ExternalId", "External ID", 255),
            _text("StockKeepingUnit", "Product SKU", 180),
            _picklist("QuantityUnitOfMeasure", "Quantity Unit Of Measure", ("Each",)),
            *_system(owner=False),
        ],
    )


def _pricebook() -> ObjectSchema:
    return _object(
        "Pricebook2",
        "Price Book",
        "Price Books",
        [
            *_head(),
            _text("Name", "Price Book Name", 255, nillable=False),
            _typed("IsActive", "boolean", "Active", nillable=False),
            _typed(
                "IsStandard",
                "boolean",
                "Is Standard Price Book",
                nillable=False,
                **_READ_ONLY,
            ),
            _text("Description", "Description", 255),
            *_system(owner=False),
        ],
    )


def _pricebook_entry() -> ObjectSchema:
    return _object(
        "PricebookEntry",
        "Price Book Entry",
        "Price Book Entries",
        [
            *_head(),
            _text("Name", "Product Name", 255, **_READ_ONLY),
            _ref(
                "Pricebook2Id",
                "Price Book ID",
                "Pricebook2",
                "Pricebook2",
                nillable=False,
                updateable=False,
                child_relationship_name="PricebookEntries",
            ),
            _ref(
                "Product2Id",
                "Product ID",
                "Product2",
                "Product2",
                nillable=False,
                updateable=False,
                child_relationship_name="PricebookEntries",
            ),
            _typed(
                "UnitPrice",
                "currency",
                "List Price",
                precision=16,
                scale=2,
                nillable=False,
            ),
            _typed("IsActive", "boolean", "Active", nillable=False),
            _typed("UseStandardPrice", "boolean", "Use Standard Price", nillable=False),
            _text("ProductCode", "Product Code", 255, **_READ_ONLY),
            *_system(owner=False),
        ],
    )


def _order() -> ObjectSchema:
    return _object(
        "Order",
        "Order",
        "Orders",
        [
            *_head(),
            _ref(
                "AccountId",
                "Account ID",
                "Account",
                "Account",
                nillable=False,
                child_relationship_name="Orders",
            ),
            _ref("Pricebook2Id", "Price Book ID", "Pricebook2", "Pricebook2"),
            _typed("EffectiveDate", "date", "Order Start Date", nillable=False),
            _typed("EndDate", "date", "Order End Date"),
            _picklist(
                "Status",
                "Status",
                ("Draft", "Activated"),
                restricted=True,
                default="Draft",
                nillable=False,
            ),
            _text(
                "OrderNumber",
                "Order Number",
                30,
                auto_number_format="{00000000}",
                nillable=False,
                **_READ_ONLY,
            ),
            _text("Name", "Order Name", 80),
            _text("PoNumber", "PO Number", 80),
            _picklist("Type", "Order Type", ("New", "Renewal", "Upgrade")),
            _long_text("Description", "Description"),
            *_address("Billing", "Billing"),
            *_address("Shipping", "Shipping"),
            _typed(
                "TotalAmount",
                "currency",
                "Order Amount",
                precision=18,
                scale=2,
                calculated=True,
                **_READ_ONLY,
            ),
            *_system(),
        ],
    )


def _order_item() -> ObjectSchema:
    return _object(
        "OrderItem",
        "Order Product",
        "Order Products",
        [
            *_head(),
            _ref(
                "OrderId",
                "Order ID",
                "Order",
                "Order",
                nillable=False,
                updateable=False,
                child_relationship_name="OrderItems",
            ),
            _ref(
                "PricebookEntryId",
                "Price Book Entry ID",
                "PricebookEntry",
                "PricebookEntry",
                nillable=False,
                updateable=False,
            ),
            _ref("Product2Id", "Product ID", "Product2", "Product2", updateable=False),
            _text(
                "OrderItemNumber",
                "Order Product Number",
                10,
                auto_number_format="{0000000000}",
                nillable=False,
                **_READ_ONLY,
            ),
            _typed(
                "Quantity", "double", "Quantity", precision=18, scale=2, nillable=False
            ),
            _typed(
                "UnitPrice",
                "currency",
                "Unit Price",
                precision=18,
                scale=2,
                nillable=False,
            ),
            _typed("ListPrice", "currency", "List Price", precision=18, scale=2),
            _typed(
                "TotalPrice",
                "currency",
                "Total Price",
                precision=18,
                scale=2,
                calculated=True,
                formula="Quantity * UnitPrice",
                **_READ_ONLY,
            ),
            _typed("ServiceDate", "date", "Start Date"),
            _typed("EndDate", "date", "End Date"),
            _text("Description", "Line Description", 255),
            *_system(owner=False),
        ],
    )


def _case() -> ObjectSchema:
    return _object(
        "Case",
        "Case",
        "Cases",
        [
            *_head(),
            _text(
                "CaseNumber",
                "Case Number",
                30,
                auto_number_format="{00000000}",
                nillable=False,
                **_READ_ONLY,
            ),
            _ref(
                "AccountId",
                "Account ID",
                "Account",
                "Account",
                child_relationship_name="Cases",
            ),
            _ref(
                "ContactId",
                "Contact ID",
                "Contact",
                "Contact",
                child_relationship_name="Cases",
            ),
            _text("Subject", "Subject", 255),
            _long_text("Description", "Description"),
            _picklist(
                "Status",
                "Status",
                ("New", "Working", "Escalated", "Closed"),
                default="New",
            ),
            _picklist(
                "Priority", "Priority", ("High", "Medium", "Low"), default="Medium"
            ),
            _picklist("Origin", "Case Origin", ("Phone", "Email", "Web")),
            _picklist(
                "Type",
                "Case Type",
                ("Mechanical", "Electrical", "Electronic", "Structural", "Other"),
            ),
            _picklist(
                "Reason",
                "Case Reason",
                (
                    "Installation",
                    "Equipment Complexity",
                    "Performance",
                    "Breakdown",
                    "Equipment Design",
                    "Feedback",
                    "Other",
                ),
            ),
            _typed("IsClosed", "boolean", "Closed", nillable=False, **_READ_ONLY),
            _typed("ClosedDate", "datetime", "Closed Date", **_READ_ONLY),
            _typed("SuppliedEmail", "email", "Web Email", length=80),
            _text("SuppliedName", "Web Name", 80),
            _text("SuppliedPhone", "Web Phone", 40),
            *_system(),
        ],
    )


def _user() -> ObjectSchema:
    return _object(
        "User",
        "User",
        "Users",
        [
            *_head(),
            _text("Username", "Username", 80, nillable=False, unique=True),
            *_person_name(),
            _typed("Email", "email", "Email", length=128, nillable=False),
            _text("Alias", "Alias", 8, nillable=False),
            _text("CommunityNickname", "Nickname", 40),
            _typed("IsActive", "boolean", "Active", nillable=False, default_value=True),
            _text("Title", "Title", 80),
            _text("CompanyName", "Company Name", 80),
            _picklist(
                "TimeZoneSidKey",
                "Time Zone",
                ("America/Los_Angeles", "America/New_York", "Europe/London", "GMT"),
                default="America/Los_Angeles",
            ),
            _picklist("LocaleSidKey", "Locale", ("en_US", "en_GB"), default="en_US"),
            _picklist("LanguageLocaleKey", "Language", ("en_US",), default="en_US"),
            _picklist(
                "EmailEncodingKey",
                "Email Encoding",
                ("UTF-8", "ISO-8859-1"),
                default="UTF-8",
            ),
            *_system(owner=False),
        ],
    )


def standard_schema() -> OrgSchema:
    """Return a fresh schema holding the standard objects."""
    schema = OrgSchema()
    for build in (
        _account,
        _contact,
        _lead,
        _opportunity,
        _product,
        _pricebook,
        _pricebook_entry,
        _order,
        _order_item,
        _case,
        _user,
    ):
        schema.add(build())
    return schema


def system_fields(owner: bool = True) -> tuple[list[FieldSchema], list[FieldSchema]]:
    """Return the leading (Id, IsDeleted) and trailing system fields of an object."""
    return _head(), _system(owner)
