"""privdpo: on-premises SFT and DPO with example-, pair- and user-level differential privacy."""

__version__ = "0.1.0"
