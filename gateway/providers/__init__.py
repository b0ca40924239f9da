"""Provider integrations, one folder each, behind the `Provider` interface of `base`."""
