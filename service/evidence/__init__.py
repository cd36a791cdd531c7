"""How far to trust a map: per-map faithfulness (deletion and insertion curves, `curves.py`) and per-model
sanity reports (cascading parameter randomisation, `sanity.py`). Issue 25; the math and its oracles:
methods-reference sections 8 and 9."""
