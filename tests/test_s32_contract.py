"""The contract's ``precision`` names one of the formats export writes; anything else is refused at load."""

import pytest

from tests.test_s27_serving_fixes import SHIPPED


@pytest.fixture(scope="module")
def shipped_metadata():
    from serving.contract import ModelContract, read_contract

    if not SHIPPED.is_file():
        pytest.skip(f"{SHIPPED} not available")
    return read_contract(SHIPPED).to_metadata(), ModelContract


@pytest.mark.parametrize("value", ['"fp64"', '"INT8 "', '""', "8"])
def test_a_precision_export_never_writes_is_refused(shipped_metadata, value):
    from serving.contract import ContractError

    meta, contract_cls = shipped_metadata
    meta["wildcheck.precision"] = value
    with pytest.raises(ContractError, match="precision"):
        contract_cls.from_metadata(meta)


@pytest.mark.parametrize("value", ['"fp32"', '"int8"'])
def test_the_formats_export_writes_load(shipped_metadata, value):
    meta, contract_cls = shipped_metadata
    meta["wildcheck.precision"] = value
    assert contract_cls.from_metadata(meta).precision == value.strip('"')
