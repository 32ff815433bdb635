"""Old import path: the JSON export lives in :mod:`diyapp.formats.json`; this re-exports its names."""

from __future__ import annotations

from .formats.json import JSON_FORMAT, JSON_VERSION, describe_json, load_model_json, save_model_json  # noqa: F401
