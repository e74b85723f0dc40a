"""``preft.v1``: the router API (generated: see proto/__init__.py)."""
