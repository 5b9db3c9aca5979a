"""Fixtures for the rule-language tests: small real indexes of the example corpora."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MEDICAL = ROOT / "examples" / "medical"
FINANCE = ROOT / "examples" / "finance"


@pytest.fixture(scope="session")
def medical_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.index import build_index

    out = tmp_path_factory.mktemp("rules-indexes") / "medical"
    build_index(MEDICAL, out, {"bm25": {}})
    return out


@pytest.fixture
def write_rules(tmp_path: Path):
    """Write a rule file into tmp_path and return its path."""

    def write(text: str, name: str = "rules.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write
