"""The names of what the scrubber finds, as its placeholders write them (`<EMAIL>`), and
the text fields it scrubs by default. Plain data, importable without Presidio."""

PATTERN_ENTITIES = (
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
NER_ENTITIES = ("PERSON", "LOCATION")  # only with a local spaCy pipeline (scrub.spacy_model)

# The columns the loaders read as text; chat messages are scrubbed in their `content`.
TEXT_FIELDS = ("prompt", "chosen", "rejected", "completion", "messages", "text")
