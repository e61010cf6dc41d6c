"""The printer make list (makes.py), without klippy: what is taken from
the cloud's answer, and the closest names."""
import pytest

from klippy_extras.polar_cloud import makes

MAKES = ["Cartesian", "Ender 3 S1 Plus", "Ender 3 V2", "Prusa Mk3S",
         "Sovol SV06"]


@pytest.mark.parametrize("data", [
    None, [], {}, {"printerMakes": "Ender"}, {"makes": ["Ender 3 V2"]}])
def test_an_answer_without_a_list_is_refused(data):
    with pytest.raises(ValueError):
        makes.parse_makes(data)


def test_only_plain_names_are_kept_sorted_and_unique():
    data = {"printerMakes": ["Sovol SV06", " Ender 3 V2 ", 7, None, "",
                             "x" * 200, "Bad\nname", "Ender 3 V2",
                             "Cartesian"]}
    assert makes.parse_makes(data) == ["Cartesian", "Ender 3 V2",
                                       "Sovol SV06"]


def test_closest_and_matching():
    assert makes.closest("Ender 3 V3", MAKES)[:2] == ["Ender 3 V2",
                                                       "Ender 3 S1 Plus"]
    assert makes.closest("prusa mk3s", MAKES)[0] == "Prusa Mk3S"
    assert makes.closest("Zzzzzz", MAKES) == []
    assert makes.matching(MAKES, "ENDER") == ["Ender 3 S1 Plus",
                                              "Ender 3 V2"]
