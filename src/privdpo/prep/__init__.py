"""Data preparation before training: `privdpo scrub` (personal identifiers) and
`privdpo inspect` (what is in preference data)."""
