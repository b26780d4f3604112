"""Which changes make the applier re-read derived fields (formulas, compound parents)."""

from __future__ import annotations

from replicator.sources.salesforce.schema import shape_of


def _describe(*fields: dict[str, object]) -> dict[str, object]:
    return {"name": "Opportunity", "fields": [{"name": "Id", "type": "id"}, *fields]}


def test_formula_over_own_fields_refreshes_only_when_an_input_changes() -> None:
    shape = shape_of(
        _describe(
            {"name": "Amount", "type": "currency"},
            {"name": "Probability", "type": "percent"},
            {"name": "NextStep", "type": "string"},
            {
                "name": "ExpectedRevenue",
                "type": "currency",
                "calculated": True,
                "calculatedFormula": "amount * Probability / 100.0",
            },
        )
    )

    assert shape.refresh_inputs == {"Amount", "Probability"}
    assert shape.needs_refresh("UPDATE", ["Amount", "LastModifiedDate"])
    assert not shape.needs_refresh("UPDATE", ["NextStep", "LastModifiedDate"])
    assert shape.needs_refresh("CREATE", [])


def test_formula_reaching_elsewhere_refreshes_after_every_change() -> None:
    for formula in ("Account.Name", "$User.Id", "TODAY() - CloseDate", "Other__c + 1"):
        shape = shape_of(
            _describe(
                {"name": "CloseDate", "type": "date"},
                {
                    "name": "F__c",
                    "type": "string",
                    "calculated": True,
                    "calculatedFormula": formula,
                },
            )
        )

        assert shape.refresh_inputs is None, formula
        assert shape.needs_refresh("UPDATE", ["CloseDate"])


def test_compound_parent_refreshes_when_a_component_changes() -> None:
    shape = shape_of(
        {
            "name": "Contact",
            "fields": [
                {"name": "Id", "type": "id"},
                {"name": "Title", "type": "string"},
                {"name": "FirstName", "type": "string", "compoundFieldName": "Name"},
                {"name": "LastName", "type": "string", "compoundFieldName": "Name"},
                {"name": "Name", "type": "string"},
            ],
        }
    )

    assert shape.needs_refresh("UPDATE", ["FirstName"])
    assert not shape.needs_refresh("UPDATE", ["Title"])


def test_object_without_derived_fields_never_refreshes() -> None:
    shape = shape_of(_describe({"name": "Amount", "type": "currency"}))

    assert not shape.needs_refresh("CREATE", ["Amount"])
    assert not shape.needs_refresh("UPDATE", ["Amount"])
