"""custom.command_line.flag: booleans as they arrive from `python -m monai.bundle run ... --key value`."""

import pytest

from custom.command_line import flag


@pytest.mark.parametrize("value", [True, 1, "true", "True", "TRUE", "yes", "on", "1", " true "])
def test_true_spellings(value):
    assert flag(value, "tta") is True


@pytest.mark.parametrize("value", [False, 0, None, "false", "False", "no", "off", "0", "None", ""])
def test_false_spellings(value):
    assert flag(value, "tta") is False


@pytest.mark.parametrize("value", ["maybe", 2, 0.5, [True]])
def test_anything_else_is_an_error_naming_the_key(value):
    with pytest.raises(ValueError, match="write_overlays must be true or false"):
        flag(value, "write_overlays")
