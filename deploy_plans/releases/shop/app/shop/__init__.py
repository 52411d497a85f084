"""The shop: a tiny example application packaged by Ferry."""

VERSION = "1.4.0"
