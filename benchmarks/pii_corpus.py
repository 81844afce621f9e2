"""A generated corpus of preference rows with planted personal identifiers, for the
scrubber's accuracy tests and its speed benchmark. Nothing in it is anyone's data.

Every row has `prompt`, `chosen` and `rejected` text of about `chars` characters together
(English and Korean filler words, harmless numbers), with identifiers of each type planted
at known places, and decoys that look alike but are not identifiers: Korean resident and
business registration numbers and card numbers with a wrong check digit. Values are drawn
from a pool, so one value recurs in several rows (in several formats, for phone numbers).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import phonenumbers

ENGLISH = (
    "the service was friendly and the delivery came on time so I would order again "
    "please answer politely and keep it short our team will check the request today "
    "thanks for the quick reply I have a question about my account and the last invoice"
).split()
KOREAN = "안녕하세요 문의 드립니다 배송이 늦어요 주문 확인 부탁드립니다 감사합니다 고객님 답변 드리겠습니다 오늘 내일 회의".split()
HARMLESS = ["3", "12", "2024", "7일", "5개", "10%", "1.5", "No. 4"]


@dataclass
class Plant:
    field: str
    entity: str | None  # None: a decoy, which must stay as it is
    value: str
    key: str = ""  # values with one key are one identifier (one pseudonym)


@dataclass
class Corpus:
    rows: list[dict]
    plants: list[list[Plant]] = field(default_factory=list)  # per row, in text order


def luhn_digit(digits: str) -> str:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 == 0 else 1)
        total += n - 9 if n > 9 else n
    return str((10 - total % 10) % 10)


def rrn_digit(first12: str) -> str:
    weights = [2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5]
    return str((11 - sum(int(d) * w for d, w in zip(first12, weights, strict=True)) % 11) % 10)


def brn_digit(first9: str) -> str:
    keys = [1, 3, 7, 1, 3, 7, 1, 3, 5]
    total = sum(int(d) * k for d, k in zip(first9[:8], keys[:8], strict=True))
    last = int(first9[8]) * 5
    return str((10 - (total + last // 10 + last) % 10) % 10)


def iban_check(country: str, bban: str) -> str:
    moved = bban + country + "00"
    number = int("".join(str(int(c, 36)) for c in moved))
    return f"{98 - number % 97:02d}"


class Values:
    """Random identifiers of each type, valid (or, for decoys, wrong on purpose)."""

    def __init__(self, rng: random.Random):
        self.r = rng

    def digits(self, n: int) -> str:
        return "".join(self.r.choice("0123456789") for _ in range(n))

    def EMAIL(self) -> tuple[str, str]:
        name = self.r.choice(["kim", "lee", "park", "choi", "jane", "john", "min"])
        domain = self.r.choice(["example.com", "mail.co.kr", "naver.com", "corp.org", "u.ac.kr"])
        value = f"{name}.{self.digits(4)}@{domain}"
        return value, value

    def URL(self) -> tuple[str, str]:
        host = self.r.choice(["shop", "blog", "my", "files"]) + self.digits(3)
        tld = self.r.choice(["com", "co.kr", "org", "net"])
        value = f"https://www.{host}.{tld}/u/{self.digits(5)}"
        return value, value

    def PHONE_NUMBER(self) -> tuple[str, str]:
        region = self.r.choice(["US", "GB", "DE", "FR", "JP", "AU"])
        example = phonenumbers.example_number_for_type(region, phonenumbers.PhoneNumberType.MOBILE)
        while True:
            national = str(example.national_number)
            number = phonenumbers.parse(
                f"+{example.country_code}{national[:-4]}{self.digits(4)}", None
            )
            if phonenumbers.is_valid_number(number):
                break
        style = phonenumbers.PhoneNumberFormat
        fmt = style.NATIONAL if region == "US" and self.r.random() < 0.5 else style.INTERNATIONAL
        return phonenumbers.format_number(number, fmt), phonenumbers.format_number(
            number, style.E164
        )

    def CREDIT_CARD(self, valid: bool = True) -> tuple[str, str]:
        prefix, length = self.r.choice([("4", 16), ("5" + self.r.choice("12345"), 16), ("37", 15)])
        body = prefix + self.digits(length - len(prefix) - 1)
        check = luhn_digit(body)
        if not valid:
            check = str((int(check) + self.r.randint(1, 9)) % 10)
        number = body + check
        sep = self.r.choice([" ", "-", ""])
        if length == 16:
            value = sep.join(number[i : i + 4] for i in range(0, 16, 4))
        else:
            value = sep.join([number[:4], number[4:10], number[10:]])
        return value, number

    def IBAN(self) -> tuple[str, str]:
        country, bban = self.r.choice(
            [("DE", self.digits(18)), ("GB", "NWBK" + self.digits(14)), ("FR", self.digits(23))]
        )
        iban = country + iban_check(country, bban) + bban
        value = " ".join(iban[i : i + 4] for i in range(0, len(iban), 4))
        return (value if self.r.random() < 0.6 else iban), iban

    def IP_ADDRESS(self) -> tuple[str, str]:
        if self.r.random() < 0.8:
            value = ".".join(
                str(x) for x in [self.r.randint(11, 223), *self.r.sample(range(256), 3)]
            )
        else:
            value = ":".join(f"{self.r.randint(1, 0xFFFF):x}" for _ in range(8))
        return value, value

    def US_SSN(self) -> tuple[str, str]:
        area = self.r.choice([a for a in range(1, 900) if a != 666])
        value = f"{area:03d}-{self.r.randint(1, 99):02d}-{self.r.randint(1, 9999):04d}"
        return value, value

    def KR_RRN(self, valid: bool = True) -> tuple[str, str]:
        century = self.r.choice([1900, 2000])
        year = self.r.randint(40, 99) if century == 1900 else self.r.randint(0, 19)
        month, day = self.r.randint(1, 12), self.r.randint(1, 28)
        gender = self.r.choice("12" if century == 1900 else "34")
        first12 = (
            f"{year:02d}{month:02d}{day:02d}{gender}{self.r.randint(0, 95):02d}{self.digits(3)}"
        )
        check = rrn_digit(first12)
        if not valid:
            check = str((int(check) + self.r.randint(1, 9)) % 10)
        number = first12 + check
        dashed = self.r.random() < 0.8
        return (f"{number[:6]}-{number[6:]}" if dashed else number), number

    def KR_PHONE(self) -> tuple[str, str]:
        kind = self.r.random()
        if kind < 0.5:
            number = f"010{self.r.randint(2000, 9999)}{self.digits(4)}"
            styles = [
                f"{number[:3]}-{number[3:7]}-{number[7:]}",
                number,
                f"+82 10-{number[3:7]}-{number[7:]}",
                f"{number[:3]}.{number[3:7]}.{number[7:]}",
            ]
        elif kind < 0.75:
            number = f"02{self.r.randint(200, 999)}{self.digits(4)}"
            styles = [f"02-{number[2:5]}-{number[5:]}", f"(02) {number[2:5]}-{number[5:]}"]
        else:
            area = self.r.choice(["031", "051", "064", "070"])
            number = f"{area}{self.r.randint(2000, 9999)}{self.digits(4)}"
            styles = [
                f"{area}-{number[3:7]}-{number[7:]}",
                f"+82 {area[1:]}-{number[3:7]}-{number[7:]}",
            ]
        return self.r.choice(styles), number

    def KR_BRN(self, valid: bool = True) -> tuple[str, str]:
        first9 = f"{self.r.randint(101, 899)}{self.r.randint(1, 99):02d}{self.digits(4)}"
        check = brn_digit(first9)
        if not valid:
            check = str((int(check) + self.r.randint(1, 9)) % 10)
        number = first9 + check
        return f"{number[:3]}-{number[3:5]}-{number[5:]}", number


ENTITIES = (
    "EMAIL",
    "PHONE_NUMBER",
    "CREDIT_CARD",
    "IBAN",
    "IP_ADDRESS",
    "URL",
    "US_SSN",
    "KR_RRN",
    "KR_PHONE",
    "KR_BRN",
)
DECOYS = ("KR_RRN", "KR_BRN", "CREDIT_CARD")  # the types with a check digit


def generate(rows: int, seed: int = 0, chars: int = 500, pool: int = 4) -> Corpus:
    """`rows` rows of about `chars` characters; each identifier value recurs in about
    `pool` rows (a value is drawn again from its type's pool, maybe in another format)."""
    r = random.Random(seed)
    values = Values(r)
    pools: dict[str, list] = {e: [] for e in ENTITIES}
    corpus = Corpus([])
    fields = ("prompt", "chosen", "rejected")
    for i in range(rows):
        row, plants = {}, []
        for name in fields:
            words, here = [], []
            budget = chars // len(fields)
            for _ in range(r.choice([0, 1, 1, 2])):
                entity = r.choice(ENTITIES)
                if pools[entity] and r.random() < 1 - 1 / pool:
                    key = r.choice(pools[entity])  # the same identifier, maybe reformatted
                    value = _reformat(entity, key, r)
                else:
                    value, key = getattr(values, entity)()
                    pools[entity].append(key)
                here.append(Plant(name, entity, value, key))
            if r.random() < 0.3:
                entity = r.choice(DECOYS)
                value, key = getattr(values, entity)(valid=False)
                here.append(Plant(name, None, value, key))
            r.shuffle(here)
            queue = list(here)
            length = 0
            while length < budget - sum(len(p.value) + 1 for p in queue) or queue:
                if queue and r.random() < 0.15:
                    word = queue.pop(0).value
                else:
                    word = (
                        r.choice(HARMLESS)
                        if r.random() < 0.05
                        else r.choice(KOREAN if r.random() < 0.4 else ENGLISH)
                    )
                words.append(word)
                length += len(word) + 1
            row[name] = " ".join(words)
            plants += here
        row["user_id"] = f"user-{i % 97}"
        row["score"] = round(r.random(), 3)
        row["id"] = i
        corpus.rows.append(row)
        corpus.plants.append(plants)
    return corpus


def _reformat(entity: str, key: str, r: random.Random) -> str:
    """Another written form of the identifier `key` (its canonical digits)."""
    if entity == "KR_PHONE" and key.startswith("010"):
        return r.choice([f"010-{key[3:7]}-{key[7:]}", key, f"+82 10-{key[3:7]}-{key[7:]}"])
    if entity == "KR_PHONE" and key.startswith("02"):
        return f"02-{key[2:5]}-{key[5:]}"
    if entity == "KR_PHONE":
        return f"{key[:3]}-{key[3:7]}-{key[7:]}"
    if entity == "PHONE_NUMBER":
        number = phonenumbers.parse(key, None)
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.INTERNATIONAL)
    if entity == "CREDIT_CARD":
        return " ".join(key[i : i + 4] for i in range(0, len(key), 4)) if len(key) == 16 else key
    if entity == "IBAN":
        return key
    if entity == "KR_RRN":
        return f"{key[:6]}-{key[6:]}"
    if entity == "KR_BRN":
        return f"{key[:3]}-{key[3:5]}-{key[5:]}"
    return key
