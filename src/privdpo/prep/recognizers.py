"""The Presidio analyzer of `privdpo scrub`: pattern recognizers, Korean ones included.

Presidio's own recognizers do the work wherever they fit: e-mail, phone numbers
(python-phonenumbers), credit cards (Luhn), IBAN (mod 97), IP addresses, URLs, US SSN,
and Korean resident and business registration numbers (their check digits). Ours are the
Korean mobile and landline numbers, a strict check-digit rule for resident registration
numbers, and an offline e-mail validator (Presidio's asks `tldextract`, which fetches the
public suffix list from the network on first use). Names and places (NER) come only from
a spaCy pipeline in a local directory; without one the analyzer is pattern-only, with
Presidio's no-op NLP engine, and loads no model at all.
"""

from __future__ import annotations

import re
from pathlib import Path

import phonenumbers
import regex
import tldextract
from presidio_analyzer import (
    AnalyzerEngine,
    LocalRecognizer,
    Pattern,
    PatternRecognizer,
    RecognizerRegistry,
    RecognizerResult,
)
from presidio_analyzer.context_aware_enhancers import ContextAwareEnhancer
from presidio_analyzer.nlp_engine import NoOpNlpEngine, SpacyNlpEngine
from presidio_analyzer.predefined_recognizers import (
    CreditCardRecognizer,
    EmailRecognizer,
    IbanRecognizer,
    IpRecognizer,
    KrBrnRecognizer,
    KrRrnRecognizer,
    PhoneRecognizer,
    SpacyRecognizer,
    UrlRecognizer,
    UsSsnRecognizer,
)

from privdpo.errors import UserError
from privdpo.prep.entities import NER_ENTITIES

# The bundled public suffix snapshot only: no suffix_list_urls, so never a download.
_OFFLINE_TLD = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

# Korean numbers: a domestic trunk 0, or +82 without it. Mobile 01X, Seoul 02, the other
# areas 031-064, internet phones 070; then 3-4 and 4 digits, with -, . or space or none.
_KR_TRUNK = r"(?:\+82[-. ]?(?:\(0\))?|0)"
_KR_MOBILE = rf"(?<![\d+]){_KR_TRUNK}1[016789][-. ]?\d{{3,4}}[-. ]?\d{{4}}(?!\d)"
_KR_AREA = r"(?:2|3[1-3]|4[1-4]|5[1-5]|6[1-4]|70)"
_KR_LANDLINE = rf"(?<![\d+]){_KR_TRUNK}{_KR_AREA}[-. ]?\d{{3,4}}[-. ]?\d{{4}}(?!\d)"
_KR_LANDLINE_PARENS = rf"(?<!\d)\(0{_KR_AREA}\) ?\d{{3,4}}[-. ]?\d{{4}}(?!\d)"


class OfflineEmailRecognizer(EmailRecognizer):
    """Presidio's e-mail pattern; the domain is checked against the bundled suffix list."""

    def validate_result(self, pattern_text: str) -> bool:
        return _OFFLINE_TLD(pattern_text).fqdn != ""


class InternationalPhoneRecognizer(LocalRecognizer):
    """Phone numbers written with a country code (+44 20 7946 0958), in any country.

    python-phonenumbers' matcher reads a number followed by other digits ("+49 1512
    3458888 2024") as one invalid number and finds nothing; here trailing groups are
    dropped until what is left is a valid number. Scored above the matcher (national
    formats), below KR_PHONE, so +82 numbers are typed KR_PHONE."""

    CANDIDATE = re.compile(r"(?<![\w+])\+[1-9][\d\-. ()]{5,24}\d")
    SCORE = 0.5

    def __init__(self, supported_language: str = "en", supported_entity: str = "PHONE_NUMBER"):
        super().__init__(
            supported_entities=[supported_entity], supported_language=supported_language
        )

    def load(self) -> None:
        pass

    def analyze(self, text: str, entities: list[str], nlp_artifacts=None) -> list:
        results = []
        for match in self.CANDIDATE.finditer(text):
            candidate = match.group()
            while len(candidate) > 7:
                try:
                    valid = phonenumbers.is_valid_number(phonenumbers.parse(candidate, None))
                except phonenumbers.NumberParseException:
                    valid = False
                if valid:
                    results.append(
                        RecognizerResult(
                            self.supported_entities[0],
                            match.start(),
                            match.start() + len(candidate),
                            self.SCORE,
                            recognition_metadata={
                                RecognizerResult.RECOGNIZER_NAME_KEY: self.name,
                                RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id,
                            },
                        )
                    )
                    break
                cut = max(candidate.rfind(c) for c in " -.(")
                candidate = candidate[:cut].rstrip(" -.(") if cut > 1 else ""
        return results


class UsPhoneRecognizer(PatternRecognizer):
    """American numbers in national format, (212) 555-0123 or 212-555-0123, each match
    validated by python-phonenumbers: a regex then a check, like Presidio's other
    recognizers, instead of its phone matcher's parse of every run of digits (half the
    scrubbing time on text full of numbers). Other regions: `phone_regions`."""

    PATTERNS = [
        Pattern(
            "US national",
            r"(?<![\d+\-.])(?:\(\d{3}\) ?|\d{3}[-. ])\d{3}[-. ]\d{4}(?![\d\-])",
            0.4,
        )
    ]

    def __init__(self, supported_language: str = "en", supported_entity: str = "PHONE_NUMBER"):
        super().__init__(
            supported_entity=supported_entity,
            patterns=self.PATTERNS,
            context=PhoneRecognizer.CONTEXT,
            supported_language=supported_language,
        )

    def validate_result(self, pattern_text: str) -> bool:
        try:
            return phonenumbers.is_valid_number(phonenumbers.parse(pattern_text, "US"))
        except phonenumbers.NumberParseException:
            return False


class KrPhoneRecognizer(PatternRecognizer):
    """Korean mobile (010-1234-5678) and landline (02-123-4567, 031-1234-5678, 070-...)
    numbers, domestic or +82; scored above the generic phone recognizer, so a Korean
    number found by both is typed KR_PHONE."""

    PATTERNS = [
        Pattern("KR mobile", _KR_MOBILE, 0.6),
        Pattern("KR landline", _KR_LANDLINE, 0.6),
        Pattern("KR landline (area code in parentheses)", _KR_LANDLINE_PARENS, 0.6),
    ]
    CONTEXT = ["전화", "휴대폰", "핸드폰", "연락처", "phone", "mobile", "tel"]

    def __init__(self, supported_language: str = "en", supported_entity: str = "KR_PHONE"):
        super().__init__(
            supported_entity=supported_entity,
            patterns=self.PATTERNS,
            context=self.CONTEXT,
            supported_language=supported_language,
        )


class OverlappingCreditCardRecognizer(CreditCardRecognizer):
    """Presidio's card patterns and Luhn check, tried at every start (overlapped): with
    plain finditer, "02-260-3702 4885-4307-6395-7686" matches "3702 4885-4307-6395",
    which fails Luhn, and the scan resumes past the real card number. A number's groups
    share one separator; of overlapping valid numbers the first is kept."""

    def analyze(self, text: str, entities: list[str], nlp_artifacts=None, regex_flags=None):
        flags = regex_flags or self.global_regex_flags
        found = []
        for pattern in self.patterns:
            for match in regex.finditer(pattern.regex, text, flags=flags, overlapped=True):
                number = match.group()
                if len(set(re.findall(r"\D", number))) > 1:  # "1401 3766-7737": two numbers
                    continue
                if self.validate_result(number) and not self.invalidate_result(number):
                    found.append((match.start(), -match.end()))
        results, end = [], -1
        for start, negative_end in sorted(found):
            if start < end:
                continue
            end = -negative_end
            results.append(
                RecognizerResult(
                    self.supported_entities[0],
                    start,
                    end,
                    self.MAX_SCORE,
                    recognition_metadata={
                        RecognizerResult.RECOGNIZER_NAME_KEY: self.name,
                        RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id,
                    },
                )
            )
        return results


class StrictKrRrnRecognizer(KrRrnRecognizer):
    """Presidio's resident registration number (YYMMDD-GNNNNNC), with its check digit
    required: Presidio keeps a number whose check digit fails at medium score (numbers
    issued since October 2020 have none); here that number is not an RRN, unless
    `require_check_digit` is off."""

    def __init__(self, require_check_digit: bool = True, **kwargs):
        self.require_check_digit = require_check_digit
        super().__init__(**kwargs)

    def validate_result(self, pattern_text: str) -> bool | None:
        valid = super().validate_result(pattern_text)
        if valid is None and self.require_check_digit:
            return False
        return valid


# Presidio's business-number patterns, less numbers starting with 0: tax-office codes
# start at 101, and a leading 0 is a Korean phone number's trunk prefix.
_KR_BRN_PATTERNS = [
    Pattern("BRN (dashed)", r"(?<!\d)[1-9]\d{2}-\d{2}-\d{5}(?!\d)", 0.1),
    Pattern("BRN (digits)", r"(?<!\d)[1-9]\d{9}(?!\d)", 0.05),
]


def pattern_recognizers(
    language: str, phone_regions: list[str], require_rrn_check_digit: bool
) -> list:
    """The recognizers of the pattern entity types (`entities.PATTERN_ENTITIES`)."""
    lang = {"supported_language": language}
    return [
        OfflineEmailRecognizer(supported_entity="EMAIL", **lang),
        InternationalPhoneRecognizer(**lang),
        UsPhoneRecognizer(**lang),
        # National formats of more regions, by python-phonenumbers' matcher; strict
        # grouping, so a Korean business number (123-45-67890) is no phone number.
        *(
            [PhoneRecognizer(supported_regions=tuple(phone_regions), leniency=2, **lang)]
            if phone_regions
            else []
        ),
        OverlappingCreditCardRecognizer(**lang),
        IbanRecognizer(supported_entity="IBAN", **lang),
        IpRecognizer(**lang),
        # Presidio's URL patterns less the two quoted forms, which find the same URLs
        # (without their quotes) and double the time of the longest regex here.
        UrlRecognizer(patterns=UrlRecognizer.PATTERNS[:2], **lang),
        UsSsnRecognizer(**lang),
        StrictKrRrnRecognizer(require_rrn_check_digit, **lang),
        KrPhoneRecognizer(**lang),
        KrBrnRecognizer(patterns=_KR_BRN_PATTERNS, **lang),
    ]


class NoContext(ContextAwareEnhancer):
    """Context words raise scores by the lemmas around a match; pattern-only, there are no
    lemmas, and Presidio's enhancer would only copy every result (a tenth of the time)."""

    def __init__(self):
        super().__init__(0, 0, 0, 0)

    def enhance_using_context(self, text, raw_results, nlp_artifacts, recognizers, context=None):
        return raw_results


def build_analyzer(
    entities: list[str],
    language: str = "en",
    phone_regions: list[str] = (),
    require_rrn_check_digit: bool = True,
    spacy_model: str | None = None,
) -> AnalyzerEngine:
    """An AnalyzerEngine holding the recognizers of `entities` only. With `spacy_model` (a
    local pipeline directory) PERSON and LOCATION come from its NER; without one, no NLP
    model is loaded (Presidio's no-op engine)."""
    recognizers = [
        r
        for r in pattern_recognizers(language, list(phone_regions), require_rrn_check_digit)
        if r.supported_entities[0] in entities
    ]
    if spacy_model is None:
        nlp = NoOpNlpEngine(models=[{"lang_code": language, "model_name": "none"}])
    else:
        path = Path(spacy_model).expanduser()
        if not (path / "meta.json").is_file() and not (path / "config.cfg").is_file():
            raise UserError(
                f"scrub.spacy_model: {spacy_model} is not a local spaCy pipeline directory (no"
                " config.cfg or meta.json); privdpo never downloads one. Copy a pipeline saved"
                " with nlp.to_disk(DIR) here, or set scrub.spacy_model=null for pattern-only"
            )
        # An existing path is loaded as is: Presidio downloads only names it cannot find.
        nlp = SpacyNlpEngine(models=[{"lang_code": language, "model_name": str(path)}])
        ner = [e for e in NER_ENTITIES if e in entities]
        if ner:
            recognizers.append(SpacyRecognizer(supported_language=language, supported_entities=ner))
    nlp.load()
    registry = RecognizerRegistry(recognizers=recognizers, supported_languages=[language])
    return AnalyzerEngine(
        registry=registry,
        nlp_engine=nlp,
        supported_languages=[language],
        context_aware_enhancer=NoContext() if spacy_model is None else None,
    )
