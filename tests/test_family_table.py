"""The README's family table (issue 26's Must-show) is what `python -m service.zoo.family_table` generates
from the self-test, not typed: README.md must hold exactly its output. After a change to the adapters or the
methods, regenerate it with `--write`."""
from __future__ import annotations

import pytest

pytest.importorskip("timm")

from service.zoo.adapters import FAMILIES  # noqa: E402
from service.zoo.family_table import BEGIN, END, README, markdown, rows, with_table  # noqa: E402


@pytest.fixture(scope="module")
def table() -> list[list[str]]:
    return rows()


def test_the_readme_holds_the_generated_family_table(table):
    readme = README.read_text(encoding="utf-8")
    table = markdown(table)
    assert readme == with_table(readme, table), (
        "README.md's family table is stale: run `python -m service.zoo.family_table --write`")
    assert readme.count(BEGIN) == 1 and readme.count(END) == 1


def test_the_table_says_which_methods_apply_to_tokens_and_to_maps(table):
    by_arch = {row[1].strip("`"): row for row in table}
    assert len(by_arch) == len(FAMILIES)
    vit = by_arch["timm:vit_tiny_patch16_224"]
    assert "attention-relevance" in vit[5] and "fullgrad" not in vit[5] and "gradcam" in vit[5]
    assert vit[3] == "tokens: drop 1 prefix, 4x4 patch grid" and vit[4] == "4x4 / 4x6"
    assert by_arch["timm:deit_tiny_distilled_patch16_224"][3].startswith("tokens: drop 2 prefix")
    assert by_arch["timm:vit_small_patch14_reg4_dinov2"][3].startswith("tokens: drop 5 prefix")
    resnet = by_arch["torchvision:resnet18"]
    assert resnet[2] == "`layer4`" and "fullgrad" in resnet[5] and "attention-relevance" not in resnet[5]
    assert all("FAILED" not in row[5] for row in by_arch.values())
