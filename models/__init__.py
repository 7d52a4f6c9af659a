"""Registry entries: one TOML file per model (installed as package data `edge_spade.models`)."""
