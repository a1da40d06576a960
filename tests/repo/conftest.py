"""A small generated git repository with a planted definition, shared by the repo tests."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

PLANTED = "compute_shipping_cost"

FILES = {
    "shop/shipping.py": f"""
        RATES = {{"eu": 4.5, "us": 7.0}}


        def {PLANTED}(weight_kg, zone):
            \"\"\"Price of shipping a parcel of `weight_kg` to `zone`.\"\"\"
            return round(RATES[zone] * max(weight_kg, 0.5), 2)
        """,
    "shop/cart.py": """
        from shop.shipping import RATES


        class Cart:
            def __init__(self):
                self.items = []

            def add(self, name, price, qty=1):
                self.items.append((name, price, qty))

            def subtotal(self):
                return sum(price * qty for _, price, qty in self.items)
        """,
    "shop/users.py": """
        def normalize_email(address):
            return address.strip().lower()


        def display_name(first, last):
            return f"{first} {last}".strip()
        """,
    "web/static/app.js": """
        import { formatPrice } from './format.js';

        export function renderTotal(total) {
          return `<b>${formatPrice(total)}</b>`;
        }
        """,
    "web/static/format.js": """
        export const formatPrice = (value) => value.toFixed(2) + ' EUR';
        """,
    "README.md": "# shop\n\nA tiny shop.\n",
    ".gitignore": "ignored/\n*.log\n",
    "ignored/secret.py": "def zz_hidden_ignored_function():\n    return 42\n",
    "debug.log": "def zz_log_function():\n    pass\n",
}


def write_repo(root: Path, files: dict[str, str] = FILES, git: bool = True) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
    if git:
        subprocess.run(["git", "init", "-q", str(root)], check=True)
    return root


@pytest.fixture
def shop_repo(tmp_path) -> Path:
    """A git repository (nothing committed: untracked files that are not ignored count as tracked)."""
    return write_repo(tmp_path / "shop")
