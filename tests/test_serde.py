from __future__ import annotations

import dataclasses
import enum
import json
import socket
import sys
import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field, computed_field

from storno._errors import PayloadTooLargeError, SerializationError
from storno._serde import DEFAULT_MAX_PAYLOAD_BYTES, TYPE_KEY, decode, describe, encode

IST = timezone(timedelta(hours=5, minutes=30))
WHAT = "argument 2 of step 'charge_card'"


class Color(enum.Enum):
    RED = "red"
    GREEN = 2


class Shape(enum.Enum):
    SQUARE = (2, 2)


class Level(enum.IntEnum):
    HIGH = 3


@dataclasses.dataclass
class Point:
    x: int
    y: int = 0


@dataclasses.dataclass(frozen=True)
class Key:
    name: str
    at: date


@dataclasses.dataclass
class Schedule:
    name: str
    times: list[datetime]
    origin: Point
    tags: frozenset[str] = frozenset()
    total: int = dataclasses.field(init=False, default=0)

    def __post_init__(self) -> None:
        self.total = len(self.times)


@dataclasses.dataclass
class Holder:
    when: Any


class Address(BaseModel):
    city: str
    since: datetime


class Customer(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str = Field(alias="fullName")
    photo: bytes
    address: Address
    balance: Decimal
    visits: set[date] = set()
    pair: tuple[int, str] = (0, "")
    color: Color = Color.RED
    extra: Any = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def initial(self) -> str:
        return self.name[:1]


def roundtrip(value: object) -> object:
    return decode(encode(value, what="test"))


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -7,
        10**30,
        1.5,
        -0.25,
        "",
        "héllo ✓",
        [],
        {},
        [1, "a", None, 2.5],
        {"a": {"b": [1, {"c": None}]}},
    ],
)
def test_json_values_round_trip_as_themselves(value: object) -> None:
    back = roundtrip(value)
    assert back == value
    assert type(back) is type(value)


@pytest.mark.parametrize(
    "value",
    [
        datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=IST),
        datetime(2024, 1, 1, tzinfo=UTC),
        datetime(2024, 1, 1, 12, 30),
        date(1999, 12, 31),
        time(8, 15, 30, 5),
        time(8, 15, tzinfo=timezone(timedelta(hours=-3))),
        timedelta(days=-3, seconds=5, microseconds=7),
        timedelta(microseconds=1),
        b"\x00\xffbinary",
        Decimal("1.10"),
        Decimal("-1E+400"),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        {3, 1, 2},
        frozenset({"a", "b"}),
        set(),
        Color.RED,
        Color.GREEN,
        Shape.SQUARE,
        Point(1, 2),
        Key("k", date(2020, 1, 2)),
    ],
)
def test_tagged_values_round_trip_with_their_type(value: object) -> None:
    back = roundtrip(value)
    assert back == value
    assert type(back) is type(value)


def test_aware_datetime_keeps_offset_and_naive_stays_naive() -> None:
    aware = roundtrip(datetime(2024, 5, 1, 9, 0, tzinfo=IST))
    assert isinstance(aware, datetime)
    assert aware.utcoffset() == timedelta(hours=5, minutes=30)
    naive = roundtrip(datetime(2024, 5, 1, 9, 0))
    assert isinstance(naive, datetime)
    assert naive.tzinfo is None


def test_decimal_keeps_its_exact_digits() -> None:
    assert str(roundtrip({"price": Decimal("19.90")})["price"]) == "19.90"  # type: ignore[index]


def test_lossy_conversions_are_the_documented_ones() -> None:
    assert roundtrip((1, (2, 3))) == [1, [2, 3]]
    assert roundtrip({1: "a", 2.5: "b", False: "c", None: "d"}) == {
        "1": "a",
        "2.5": "b",
        "false": "c",
        "null": "d",
    }
    assert roundtrip({1: "a", "b": 2}) == {"1": "a", "b": 2}
    back = roundtrip(bytearray(b"ab"))
    assert back == b"ab"
    assert type(back) is bytes
    assert roundtrip(Level.HIGH) == 3


def test_nested_dataclass_with_aware_datetimes_and_init_false_field() -> None:
    times = [datetime(2024, 1, 1, 8, tzinfo=IST), datetime(2024, 1, 2, 8, tzinfo=UTC)]
    value = Schedule("daily", times, Point(3), frozenset({"x", "y"}))
    value.total = 99  # recorded as is, not recomputed by __post_init__ on the way back
    back = roundtrip(value)
    assert back == value
    assert isinstance(back, Schedule)
    assert back.total == 99
    assert isinstance(back.origin, Point)
    assert [t.utcoffset() for t in back.times] == [timedelta(hours=5, minutes=30), timedelta(0)]


def test_pydantic_model_with_bytes_nested_model_and_alias() -> None:
    value = Customer(
        fullName="Ada",
        photo=b"\x89PNG",
        address=Address(city="Paris", since=datetime(2020, 1, 1, tzinfo=IST)),
        balance=Decimal("10.50"),
        visits={date(2024, 1, 1), date(2024, 2, 1)},
        pair=(1, "x"),
        color=Color.GREEN,
    )
    text = encode(value, what="test")
    assert '"initial"' not in text  # computed fields are not stored
    assert "fullName" in text
    back = decode(text)
    assert back == value
    assert isinstance(back, Customer)
    assert isinstance(back.address, Address)
    assert back.address.since.utcoffset() == timedelta(hours=5, minutes=30)
    assert back.pair == (1, "x")


def test_mixed_nesting() -> None:
    value = {
        "amounts": {"net": Decimal("1.5"), "tax": Decimal("0.30")},
        "pairs": frozenset({(1, ("a", 2)), (0, ("b", 3))}),
        "points": [Point(1), {Point(2) == Point(2): [Color.RED]}],
        "ids": {uuid.UUID(int=1), uuid.UUID(int=2)},
    }
    back = roundtrip(value)
    assert back["pairs"] == value["pairs"]  # type: ignore[index]
    assert back["amounts"] == value["amounts"]  # type: ignore[index]
    assert back["points"] == [Point(1), {"true": [Color.RED]}]  # type: ignore[index]
    assert back["ids"] == value["ids"]  # type: ignore[index]


def test_encoding_is_compact_and_sorted() -> None:
    text = encode({"b": [1, 2], "a": Point(1, 2)}, what="test")
    mod = Point.__module__
    assert text == (
        f'{{"a":{{"{TYPE_KEY}":"dataclass","cls":"{mod}:Point","v":{{"x":1,"y":2}}}},"b":[1,2]}}'
    )


def test_encoding_is_canonical_for_dicts_and_sets() -> None:
    one = {"z": 1, "a": {"y": 2, "b": 3}}
    two = {"a": {"b": 3, "y": 2}, "z": 1}
    assert encode(one, what="t") == encode(two, what="t")
    first: set[int] = set()
    second: set[int] = set()
    for n in (1, 9, 17):
        first.add(n)
    for n in (17, 9, 1):
        second.add(n)
    assert list(first) != list(second)  # same set, iterated in another order
    assert encode(first, what="t") == encode(second, what="t")
    nested_a = frozenset({(2, "b"), (1, "a"), (3, date(2020, 1, 1))})
    nested_b = frozenset([(3, date(2020, 1, 1)), (1, "a"), (2, "b")])
    assert encode(nested_a, what="t") == encode(nested_b, what="t")


def test_error_names_what_path_and_type() -> None:
    value = {"items": [0, 1, 2, Holder(when=lambda: None)]}
    with pytest.raises(SerializationError) as info:
        encode(value, what=WHAT)
    message = str(info.value)
    assert WHAT in message
    assert '`["items"][3].when`' in message
    assert "function" in message
    assert "pass JSON-compatible values, dataclasses or pydantic models" in message


def gen() -> Any:
    yield 1


@pytest.mark.parametrize(
    ("value", "path", "type_name"),
    [
        ([gen()], "[0]", "generator"),
        ({"a": object()}, '["a"]', "object"),
        (
            {"s": {"t": (1, {2, frozenset({memoryview(b"x")})})}},
            '["s"]["t"][1]{…}{…}',
            "memoryview",
        ),
        (
            Customer(
                fullName="A",
                photo=b"",
                address=Address(city="c", since=datetime(2020, 1, 1)),
                balance=Decimal(1),
                extra=[object()],
            ),
            ".extra[0]",
            "object",
        ),
    ],
)
def test_unsupported_types_are_refused_with_path(value: object, path: str, type_name: str) -> None:
    with pytest.raises(SerializationError, match="pass JSON-compatible") as info:
        encode(value, what=WHAT)
    assert f"`{path}`" in str(info.value)
    assert f"of type {type_name};" in str(info.value)


def test_socket_is_refused() -> None:
    with socket.socket() as sock, pytest.raises(SerializationError, match=r"type socket\.socket"):
        encode({"conn": sock}, what=WHAT)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_are_refused(bad: float) -> None:
    with pytest.raises(SerializationError) as info:
        encode({"x": [1.0, bad]}, what=WHAT)
    assert WHAT in str(info.value)
    assert '`["x"][1]`' in str(info.value)
    assert str(bad) in str(info.value)


def test_bad_dict_keys_are_refused() -> None:
    with pytest.raises(SerializationError, match=r"key \(1, 2\) of type tuple"):
        encode({"m": {(1, 2): "x"}}, what=WHAT)
    with pytest.raises(SerializationError, match="two keys that become '1'"):
        encode({1: "a", "1": "b"}, what=WHAT)
    with pytest.raises(SerializationError, match="key nan of type float"):
        encode({float("nan"): 1}, what=WHAT)


def test_reserved_key_is_refused_wherever_it_is() -> None:
    for value in (
        {TYPE_KEY: "datetime", "v": "2020-01-01"},
        [datetime(2020, 1, 1), {"a": {TYPE_KEY: 1}}],
        Holder(when={TYPE_KEY: "x"}),
    ):
        with pytest.raises(SerializationError, match="reserved key") as info:
            encode(value, what=WHAT)
        assert WHAT in str(info.value)


def test_key_that_only_ends_with_the_reserved_name_is_fine() -> None:
    value = {f'x"{TYPE_KEY}': datetime(2020, 1, 1), "y": [date(2020, 1, 1)]}
    assert roundtrip(value) == value


def test_cycles_and_deep_nesting_are_refused() -> None:
    loop: list[object] = []
    loop.append({"again": loop})
    with pytest.raises(SerializationError, match=r'`\[0\]\["again"\]` contains itself'):
        encode(loop, what=WHAT)
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(SerializationError, match="nested too deeply"):
        encode(deep, what=WHAT)


def test_classes_defined_in_functions_are_refused_when_encoding() -> None:
    @dataclasses.dataclass
    class Local:
        x: int

    with pytest.raises(SerializationError, match="module level") as info:
        encode({"a": Local(1)}, what=WHAT)
    assert "<locals>.Local" in str(info.value)


def test_payload_limit_counts_utf8_bytes() -> None:
    text = encode("abc", what="t")
    assert encode("abc", what="t", limit=len(text)) == text
    with pytest.raises(PayloadTooLargeError) as info:
        encode("abc", what=WHAT, limit=len(text) - 1)
    assert info.value.size == len(text)
    assert WHAT in str(info.value)

    wide = "é" * 10  # 10 characters, 20 bytes, plus two quotes
    assert encode(wide, what="t", limit=22) == f'"{wide}"'
    with pytest.raises(PayloadTooLargeError) as info:
        encode(wide, what="t", limit=21)
    assert info.value.size == 22
    assert DEFAULT_MAX_PAYLOAD_BYTES == 2 * 1024 * 1024
    with pytest.raises(PayloadTooLargeError):
        encode("x" * DEFAULT_MAX_PAYLOAD_BYTES, what="t")


def test_lone_surrogate_is_refused() -> None:
    with pytest.raises(SerializationError, match=r'`\["s"\]` is text with a lone surrogate'):
        encode({"s": "a\ud800"}, what=WHAT)


def test_decode_refuses_unloaded_module_without_importing_it() -> None:
    module = "storno_test_never_imported_module"
    text = json.dumps({TYPE_KEY: "dataclass", "cls": f"{module}:Thing", "v": {}})
    with pytest.raises(SerializationError) as info:
        decode(text, what="result of step 'ship'")
    message = str(info.value)
    assert "result of step 'ship'" in message
    assert f"{module}:Thing" in message
    assert f"import module {module} in the worker before reading this value" in message
    assert module not in sys.modules


@pytest.mark.parametrize(
    ("tagged", "expected"),
    [
        ({TYPE_KEY: "dataclass", "cls": f"{__name__}:Missing", "v": {}}, "does not define"),
        ({TYPE_KEY: "enum", "cls": f"{__name__}:Point", "v": 1}, "to be a enum class"),
        ({TYPE_KEY: "dataclass", "cls": "os:system", "v": {}}, "does not define"),
        ({TYPE_KEY: "pydantic", "cls": "builtins:dict", "v": {}}, "to be a pydantic class"),
        ({TYPE_KEY: "dataclass", "v": {}}, "not as 'module:QualName'"),
        ({TYPE_KEY: "pickle", "v": "x"}, "unknown tagged value"),
        ({TYPE_KEY: "datetime"}, "unknown tagged value"),
        ({TYPE_KEY: "datetime", "v": "yesterday"}, "datetime that cannot be rebuilt"),
        ({TYPE_KEY: "enum", "cls": f"{__name__}:Color", "v": "blue"}, "'blue' is not a valid"),
        ({TYPE_KEY: "dataclass", "cls": f"{__name__}:Point", "v": {"z": 1}}, "cannot be rebuilt"),
    ],
)
def test_decode_refuses_bad_tags(tagged: dict[str, Any], expected: str) -> None:
    with pytest.raises(SerializationError, match="cannot read input of saga 'x'") as info:
        decode(json.dumps({"a": [tagged]}), what="input of saga 'x'")
    assert expected in str(info.value)


@pytest.mark.parametrize("text", ["{not json", '{"a": NaN}', "[1,", ""])
def test_decode_refuses_invalid_json(text: str) -> None:
    with pytest.raises(SerializationError, match="stored result is not valid JSON"):
        decode(text, what="stored result")


def test_decode_accepts_tags_written_with_spaces() -> None:
    assert decode(f'{{ "{TYPE_KEY}" : "date", "v": "2020-01-02" }}') == date(2020, 1, 2)


def test_describe_renders_tags_and_truncates() -> None:
    text = encode({"when": datetime(2024, 1, 1), "p": Point(1, 2), "s": {2, 1}}, what="t")
    assert (
        describe(text)
        == '{"p": Point(x=1, y=2), "s": {1, 2}, "when": datetime(2024-01-01T00:00:00)}'
    )
    long = describe(encode(list(range(1000)), what="t"), max_chars=30)
    assert len(long) == 30
    assert long.endswith("…")
    assert long.startswith("[0, 1, 2, 3")
    assert describe("{broken json" * 20, max_chars=12) == "{broken jso…"
    assert describe(encode("x" * 10_000_000, what="t", limit=10**9), max_chars=10) == '"xxxxxxxx…'
    assert describe("[1,2]") == "[1, 2]"
